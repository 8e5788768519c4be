"""Command line: `python -m grpo_lib train ...` (the main job) and `python -m grpo_lib plan ...`.

    python -m grpo_lib train --preset cpu-tiny --steps 30 --run-dir runs/demo
    python -m grpo_lib train --config my_run.yaml --run-dir runs/big --save-steps 25
    python -m grpo_lib train --preset cpu-tiny --run-dir runs/demo --resume
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .config import PRESETS, ConfigError, GRPOConfig


def parse_overrides(pairs: list[str]) -> dict:
    """["beta=0.0", "loss_type=dapo"] -> {"beta": 0.0, "loss_type": "dapo"} (values parsed as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_config(args) -> GRPOConfig:
    overrides = parse_overrides(args.set or [])
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    if args.save_steps is not None:
        overrides["save_steps"] = args.save_steps
    if args.config:
        return GRPOConfig.from_yaml(args.config, **overrides)
    return GRPOConfig.preset(args.preset, **overrides)


def cmd_train(args) -> int:
    from . import data, eval as evaluation, models, runlog
    from .trainer import GRPOTrainer

    config = build_config(args)
    run_dir = Path(args.run_dir)
    print(f"config: {config.model} task={config.task} G={config.num_generations} "
          f"prompts/step={config.prompts_per_step} steps={config.max_steps} -> {run_dir}", flush=True)
    if not _memory_plan_fits(config):
        return 3
    t0 = time.time()
    model, tokenizer = models.load_policy_from_config(config)
    print(f"model loaded in {time.time() - t0:.1f}s", flush=True)
    train_rows = data.load_task(config.task, "train", seed=config.seed, system_prompt=config.system_prompt,
                                one_shot=config.one_shot)
    eval_rows = data.load_task(config.task, "test", n=config.num_eval_prompts, seed=config.seed,
                               system_prompt=config.system_prompt,
                               one_shot=config.one_shot) if config.num_eval_prompts else []
    trainer = GRPOTrainer(model, tokenizer, config=config, train_dataset=train_rows, run_dir=run_dir)
    if args.resume:
        print(f"resumed from step {trainer.resume(force=args.force)}", flush=True)

    before = _cached_eval(run_dir / "eval_before.json", lambda: evaluation.evaluate(
        model, tokenizer, eval_rows, config.max_completion_length)) if eval_rows else None
    if before:
        print(f"before training: format {before['format']:.3f}  correct {before['accuracy']:.3f} "
              f"on {before['n']} held-out prompts", flush=True)
    from .widgets import TrainingDashboard

    dashboard = TrainingDashboard(config.max_steps)
    trainer.train(on_step=dashboard.update)
    dashboard.close()
    if eval_rows:
        after = evaluation.evaluate(model, tokenizer, eval_rows, config.max_completion_length)
        _write_json(run_dir / "eval_after.json", after)
        print("\n" + evaluation.comparison_table(before, after), flush=True)
    _save_plots(run_dir, before, after if eval_rows else None)
    print(f"\nrun log {run_dir / runlog.LOG_NAME}, adapter {run_dir / 'adapter'}, "
          f"total {time.time() - t0:.0f}s", flush=True)
    return 0


def _memory_plan_fits(config) -> bool:
    """On a GPU, print the planned peak memory and refuse a run that would not fit (with cheaper settings)."""
    import torch

    if not torch.cuda.is_available():
        return True
    from . import memory

    report = memory.estimate(config, config.model)
    print(memory.format_report(report), flush=True)
    if not report.fits:
        print("refusing to start: this configuration would not fit on this GPU. Try:\n  "
              + "\n  ".join(memory.suggest_cheaper(config, config.model, report.device_bytes)), file=sys.stderr)
    return report.fits


def _cached_eval(path: Path, compute) -> dict:
    """The 'before' evaluation is computed once per run directory, so a resumed run compares with it."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    _write_json(path, result)
    return result


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _save_plots(run_dir: Path, before, after) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from . import plots, runlog

    records = runlog.load_run_log(run_dir)
    plots.plot_training_curves(records).savefig(run_dir / "training_curves.png", dpi=100)
    plots.plot_group_advantages(records[-1]).savefig(run_dir / "group_advantages.png", dpi=100)
    if before and after:
        plots.plot_eval_comparison(before, after).savefig(run_dir / "eval_comparison.png", dpi=100)


def cmd_plan(args) -> int:
    from . import memory

    config = build_config(args)
    report = memory.estimate(config, config.model)
    print(memory.format_report(report))
    return 0 if report.fits else 1


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grpo_lib", description="GRPO workbench")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "run GRPO training"), ("plan", "predict peak GPU memory of a config")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
        s.add_argument("--config", help="YAML config file (overrides the preset)")
        s.add_argument("--steps", type=int, help="max_steps")
        s.add_argument("--save-steps", type=int, help="checkpoint interval in steps")
        s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override one config field")
        if name == "train":
            s.add_argument("--run-dir", required=True, help="where the run log, checkpoints and plots go")
            s.add_argument("--resume", action="store_true", help="continue from the last good checkpoint")
            s.add_argument("--force", action="store_true", help="with --resume: accept a run dir made with "
                           "another config")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # peft asks transformers a deprecated question on every forward; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return {"train": cmd_train, "plan": cmd_plan}[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
