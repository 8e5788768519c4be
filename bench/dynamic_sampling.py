"""The main job with and without dynamic sampling: held-out correctness against wall-clock time, in one run.

    python bench/dynamic_sampling.py                    # the main job's settings, 30 steps, eval every 5
    python bench/dynamic_sampling.py --json bench/dynamic_sampling.json --png bench/dynamic_sampling.png

Both arms: the cpu-tiny preset (the main job: embedded SmolLM2-135M, LoRA r=16, `larger` task, 4 prompts x
G=8, 24-token completions, beta=0.04), the same seed (`--seed`: the same data order and LoRA initialisation,
so the arms differ only in dynamic sampling), each in its own subprocess, one after the other (never
side by side: two torch processes on 2 cores slow each other several-fold). Arm B sets dynamic_sampling=True
(max_resample_rounds=3). Every `--eval-every` steps each arm evaluates the same 64 held-out prompts x 2
samples (grpo_lib.eval.evaluate, its RNG forked, so evaluating changes nothing); the clock counts training
only (steps, extra generation rounds included), not the evaluations. The script prints, per arm, correctness
against training seconds, the seconds each arm needed to reach a held-out correctness, and what each had
reached at the other's end time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ARMS = {"plain": {}, "dynamic": {"dynamic_sampling": True, "max_resample_rounds": 3}}


def run_arm(args) -> dict:
    """One arm in this process: (training seconds, steps, held-out correctness) every eval_every steps."""
    import torch

    from grpo_lib import data, eval as evaluation, models
    from grpo_lib.config import GRPOConfig
    from grpo_lib.trainer import GRPOTrainer

    torch.set_num_threads(args.threads)
    config = GRPOConfig.preset("cpu-tiny", max_steps=args.steps, seed=args.seed, **ARMS[args.arm])
    model, tokenizer = models.load_policy_from_config(config)
    eval_rows = data.task_rows(config, "test")
    trainer = GRPOTrainer(model, tokenizer, config=config, train_dataset=data.task_rows(config))
    curve = [{"step": 0, "train_s": 0.0, "accuracy": evaluation.evaluate(model, tokenizer, eval_rows, config)["accuracy"],
              "groups_generated": 0}]
    train_s, generated = 0.0, 0
    while trainer.step_count < config.max_steps:
        t0 = time.perf_counter()
        record = trainer.step()
        train_s += time.perf_counter() - t0
        generated += record.metrics.get("sampling/groups_generated", record.num_groups)
        if trainer.step_count % args.eval_every == 0 or trainer.step_count == config.max_steps:
            accuracy = evaluation.evaluate(model, tokenizer, eval_rows, config)["accuracy"]
            curve.append({"step": trainer.step_count, "train_s": round(train_s, 1), "accuracy": accuracy,
                          "groups_generated": generated})
            print(f"  {args.arm}: step {trainer.step_count:3d}  {train_s:7.1f} s  held-out correct {accuracy:.3f}",
                  flush=True)
    return {"arm": args.arm, "curve": curve}


def seconds_to_reach(curve: list[dict], accuracy: float) -> float | None:
    return next((p["train_s"] for p in curve if p["accuracy"] >= accuracy), None)


def accuracy_at(curve: list[dict], seconds: float) -> float:
    """The last evaluated correctness at or before `seconds` of training."""
    return max((p for p in curve if p["train_s"] <= seconds), key=lambda p: p["train_s"])["accuracy"]


def draw(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for arm, curve in curves.items():
        ax.plot([p["train_s"] for p in curve], [p["accuracy"] for p in curve], "o-", label=arm)
    ax.set_xlabel("training seconds (evaluation not counted)"), ax.set_ylabel("held-out correct (64 prompts x 2)")
    ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("the main job with and without dynamic sampling", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0, help="the config's seed (data order, LoRA initialisation, sampling)")
    p.add_argument("--json", help="write both curves here")
    p.add_argument("--png", help="draw held-out correctness against training seconds here (the README's figure)")
    p.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: run one arm
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        with open(args.out, "w") as f:
            json.dump(run_arm(args), f)
        return 0

    results = {}
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    for arm in ARMS:
        out = f"/tmp/dynamic_sampling_{arm}_{os.getpid()}.json"
        print(f"{arm}: {ARMS[arm] or 'the main job as it is'}", flush=True)
        subprocess.run([sys.executable, __file__, "--arm", arm, "--out", out, "--steps", str(args.steps),
                        "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--seed", str(args.seed)],
                       check=True, env=env)
        with open(out) as f:
            results[arm] = json.load(f)["curve"]

    plain, dynamic = results["plain"], results["dynamic"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; seed {args.seed}, "
          f"{args.steps} steps, held-out correctness on 64 prompts x 2 samples")
    print(f"{'':28}{'plain':>10}{'dynamic':>10}")
    print(f"{'correct before':28}{plain[0]['accuracy']:>10.3f}{dynamic[0]['accuracy']:>10.3f}")
    print(f"{'correct at the end':28}{plain[-1]['accuracy']:>10.3f}{dynamic[-1]['accuracy']:>10.3f}")
    print(f"{'training seconds':28}{plain[-1]['train_s']:>10.0f}{dynamic[-1]['train_s']:>10.0f}")
    print(f"{'groups generated':28}{plain[-1]['groups_generated']:>10d}{dynamic[-1]['groups_generated']:>10d}")
    for target in (0.8, 0.9):
        a, b = seconds_to_reach(plain, target), seconds_to_reach(dynamic, target)
        fmt = lambda s: "never" if s is None else f"{s:.0f} s"  # noqa: E731
        print(f"{f'seconds to reach {target:.1f}':28}{fmt(a):>10}{fmt(b):>10}")
    end = min(plain[-1]["train_s"], dynamic[-1]["train_s"])
    print(f"{f'correct after {end:.0f} s of training':28}{accuracy_at(plain, end):>10.3f}{accuracy_at(dynamic, end):>10.3f}")
    if args.png:
        draw(results, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "eval_every": args.eval_every, "seed": args.seed, "machine": platform.machine(),
                       "cores": os.cpu_count(), "curves": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
