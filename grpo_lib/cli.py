"""Command line: `python -m grpo_lib train ...` (the main job) and `python -m grpo_lib plan ...`.

    python -m grpo_lib train --preset cpu-tiny --steps 30 --run-dir runs/demo
    python -m grpo_lib train --config my_run.yaml --run-dir runs/big --save-steps 25
    python -m grpo_lib train --preset cpu-tiny --run-dir runs/demo --resume
    python -m grpo_lib doctor runs/demo        # what went wrong (or right) in a run, with advice
    python -m grpo_lib export runs/demo --merged exports/demo --gguf exports/demo.gguf --quant q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
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
    from . import data, eval as evaluation, memory_advice, models, runlog
    from .doctor import diagnose, format_findings
    from .console import TerminalDashboard
    from .trainer import GRPOTrainer

    config = build_config(args)
    run_dir = Path(args.run_dir)
    print(f"config: {config.model} task={config.task} G={config.num_generations} "
          f"prompts/step={config.prompts_per_step} steps={config.max_steps} -> {run_dir}", flush=True)
    report = memory_advice.plan_or_refuse(config)  # on a GPU: refuse, before loading anything, a run that cannot fit
    if report is not None:
        print(memory_advice.format_report(report), flush=True)
    t0 = time.time()
    model, tokenizer = models.load_policy_from_config(config)
    print(f"model loaded in {time.time() - t0:.1f}s", flush=True)
    eval_rows = data.task_rows(config, "test") if config.num_eval_prompts else []
    trainer = GRPOTrainer(model, tokenizer, config=config, train_dataset=data.task_rows(config), run_dir=run_dir)
    if args.resume:
        print(f"resumed from step {trainer.resume(force=args.force)}", flush=True)

    t_eval = time.time()
    before = evaluation.cached_evaluate(run_dir / "eval_before.json", model, tokenizer, eval_rows,
                                        config) if eval_rows else None
    if before:
        print(f"before training: format {before['format']:.3f}  correct {before['accuracy']:.3f} "
              f"on {before['n']} held-out prompts", flush=True)
    dashboard = TerminalDashboard(config.max_steps, eval_seconds=time.time() - t_eval if eval_rows else None,
                                  config=config.to_dict())
    trainer.train(on_step=dashboard.update)
    dashboard.close()
    if trainer.stop_reason:
        print(trainer.stop_reason, flush=True)
    after = None
    if eval_rows:
        after = evaluation.evaluate(model, tokenizer, eval_rows, config)
        _write_json(run_dir / "eval_after.json", after)
        print("\n" + evaluation.comparison_table(before, after), flush=True)
    _save_plots(run_dir, before, after)
    print("\n" + format_findings(diagnose(run_dir)), flush=True)  # the whole run log, resumed steps included
    print(f"\nrun log {run_dir / runlog.LOG_NAME}, adapter {run_dir / 'adapter'}, "
          f"total {time.time() - t0:.0f}s", flush=True)
    return 0


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
    from . import memory, memory_advice

    config = build_config(args)
    report = memory.estimate(config, config.model)
    print(memory_advice.format_report(report))
    if not report.fits:
        advice = memory_advice.suggest_cheaper(config, config.model, report.device_bytes)
        print("cheaper settings:\n  " + "\n  ".join(advice))
    return 0 if report.fits else 1


def cmd_doctor(args) -> int:
    """Print the run doctor's findings; exit 0 whatever it finds (a missing directory is a user error)."""
    from . import doctor, runlog, runview

    path = Path(args.run_dir)
    if not path.exists():
        raise runlog.RunDirError(f"{path} does not exist")
    log = path / runlog.LOG_NAME if path.is_dir() else path
    if not log.exists() and runview.trl_state_path(path) is None:
        print(f"run doctor: no run log at {log} (nor a TRL {runview.TRL_STATE}): nothing to diagnose yet (no step "
              f"has finished)")
        return 0
    view = runview.load_run(path, GRPOConfig.from_yaml(args.config) if args.config else None)
    findings = doctor.diagnose(view)
    print(doctor.findings_json(findings) if args.json else
          doctor.format_findings(findings, not_run=doctor.checks_not_run(view)))
    return 0


def cmd_export(args) -> int:
    """Merge a run's adapter into a standalone checkpoint and/or a GGUF file, with a model card; optionally upload."""
    from . import export

    export.export_run(args.run_dir, merged_dir=args.merged, gguf_path=args.gguf, quant=args.quant, dtype=args.dtype,
                      verify=args.verify, push_to_hub_repo=args.push_to_hub)
    return 0


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
    d = sub.add_parser("doctor", help="diagnose a run from its log (reward signal, saturation, KL, length, ...)")
    d.add_argument("run_dir", help="a run directory (or its log.jsonl), or a TRL output dir (its trainer_state.json)")
    d.add_argument("--config", help="the run's YAML config, where the run dir has no config.json (a TRL run)")
    d.add_argument("--json", action="store_true", help="print the findings as JSON")
    e = sub.add_parser("export", help="merge a run's adapter: a Hugging Face checkpoint, a GGUF, a model card")
    e.add_argument("run_dir", help="a finished run directory (with adapter/ and config.json)")
    e.add_argument("--merged", metavar="OUT_DIR", help="write the merged checkpoint (safetensors) here")
    e.add_argument("--gguf", metavar="OUT.gguf", help="write a GGUF file for llama.cpp / Ollama here")
    e.add_argument("--quant", default="f16", choices=("f16", "q8_0", "q4_0"), help="GGUF weight type")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="merge dtype (auto: bf16 for a 4-bit run, else the run's compute dtype)")
    e.add_argument("--verify", action="store_true", help="measure the exports against the adapter-on model on "
                   "held-out prompts (loads the GGUF back)")
    e.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this Hugging Face model repo")
    return p


def user_errors() -> dict[type, str]:
    """The exceptions that are the user's to fix (bad config, model name or config file, data, run directory,
    reward function, memory), each with the label of its one-line message. Anything else, a ValueError or an
    OSError included, may be a bug: a traceback."""
    from .data import DataError
    from .export import ExportError
    from .memory_advice import MemoryPlanError
    from .rewards import RewardFunctionError
    from .runlog import RunDirError
    from .trainer import StepOOMError

    return {ConfigError: "config error", DataError: "data error", RunDirError: "run directory",
            RewardFunctionError: "reward function", MemoryPlanError: "memory", StepOOMError: "out of memory",
            ExportError: "export"}


def doctor_pointer(args) -> str:
    """After an unexpected error (the traceback above it): where the run's steps so far are, and the command
    that reads them; or that there are none."""
    from .runlog import LOG_NAME

    run_dir = getattr(args, "run_dir", None)
    if args.command == "doctor" or run_dir is None or not (Path(run_dir) / LOG_NAME).exists():
        return "an unexpected error (a bug in grpo_lib or a library it calls, not a setting to fix): see above"
    return (f"an unexpected error (see above); the steps logged before it are in {Path(run_dir) / LOG_NAME}: "
            f"`python -m grpo_lib doctor {run_dir}` reads them")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "plan": cmd_plan, "doctor": cmd_doctor,
                "export": cmd_export}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: the run log and the last checkpoint are kept; continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:
        label = next((label for kind, label in user_errors().items() if isinstance(e, kind)), None)
        if label is None:  # not an error the user can fix by a setting: the traceback, to find the cause
            traceback.print_exc()
            print(doctor_pointer(args), file=sys.stderr)
            return 1
        if os.environ.get("GRPO_LIB_DEBUG"):  # GRPO_LIB_DEBUG=1: a user error's traceback too
            traceback.print_exc()
        if label == "memory":  # the plan table and the cheaper settings
            print(f"{label}: {e}", file=sys.stderr)
            return 3
        print(f"{label}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
