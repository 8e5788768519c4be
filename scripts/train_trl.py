"""GRPO with TRL's GRPOTrainer, configured by a grpo_lib YAML config file: the multi-GPU path.

The same file trains with the workbench's own trainer (`python -m grpo_lib train --config FILE`). Here
grpo_lib.trl_bridge maps it to trl.GRPOConfig, loads the model (nf4 if load_in_4bit), the LoRA adapter, the
task's prompts and the reward functions, and TRL does the rest. See docs/scale_out.md.

    python scripts/train_trl.py --config configs/cpu-tiny.yaml --output-dir runs/trl-tiny --steps 2
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 \\
        scripts/train_trl.py --config configs/multi-gpu.yaml --output-dir runs/zero2
    ... --trl use_vllm=true --trl vllm_mode=server          (TRL-only settings, values parsed as YAML)
"""

from __future__ import annotations

import argparse
import sys
import time


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GRPO with TRL's trainer from a grpo_lib config file")
    p.add_argument("--config", required=True, help="grpo_lib YAML config (the file `python -m grpo_lib train` reads)")
    p.add_argument("--output-dir", default="runs/trl", help="TRL's output_dir: checkpoints, the final adapter/model")
    p.add_argument("--steps", type=int, help="override max_steps (grpo_lib steps: one generation batch each)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override one grpo_lib config field")
    p.add_argument("--trl", action="append", metavar="KEY=VALUE",
                   help="a TRL-only setting (e.g. use_vllm=true); grpo_lib's own knobs go in the config")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    return p


def run(argv: list[str] | None = None):
    """Train; returns the trl.GRPOTrainer (its state.log_history holds the logged metrics)."""
    from grpo_lib import trl_bridge
    from grpo_lib.cli import parse_overrides
    from grpo_lib.config import GRPOConfig

    args = make_parser().parse_args(argv)
    overrides = parse_overrides(args.set or [])
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    config = GRPOConfig.from_yaml(args.config, **overrides)
    # the TRL config first: under ZeRO-3 it makes from_pretrained partition the weights while loading
    trl_args = trl_bridge.to_trl_config(config, args.output_dir, **parse_overrides(args.trl or []))
    rank0 = trl_args.process_index == 0
    t0 = time.time()
    model, tokenizer = trl_bridge.load_model(config)
    if rank0:
        print(f"config {args.config}: {config.model} task={config.task} G={config.num_generations} "
              f"prompts/step={config.prompts_per_step} steps={config.max_steps} on {trl_args.world_size} process(es) "
              f"-> {args.output_dir} (model loaded in {time.time() - t0:.1f}s)", flush=True)
    trainer = trl_bridge.make_trl_trainer(config, model, tokenizer, args=trl_args)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(args.output_dir)  # the LoRA adapter (or the full model when lora_r = 0)
    return trainer


def main(argv: list[str] | None = None) -> int:
    from grpo_lib.config import ConfigError

    try:
        run(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
