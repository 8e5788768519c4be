"""Is the main job robust to its seed? Runs `python -m grpo_lib train --preset cpu-tiny --set seed=S` for each
seed and prints one row per seed: held-out correctness before and after, the first step whose sampled
completions were >= 90% correct, the doctor's findings on the finished run (its PROBLEM and WARNING titles) and
what the live doctor printed during training
(PROBLEM and WARNING lines).

    python bench/seed_sweep.py --seeds 0 1 2 3 4 --jobs 2 --json bench/seed_sweep.json

--jobs N runs N seeds at once, each with OMP_NUM_THREADS = cores // N (two torch processes sharing 2 cores
with the default thread count slow each other several-fold). The results do not depend on the timing;
per-seed wall times are printed for information only. Extra `--set key=value` pairs go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo_lib import runlog  # noqa: E402
from grpo_lib.doctor import diagnose  # noqa: E402

LIVE = re.compile(r"^doctor: \[(PROBLEM|WARNING)\] (.+?) \(", re.M)  # console.TerminalDashboard's live lines


def run_seed(seed: int, root: Path, threads: int, sets: list[str]) -> dict:
    """Trains one seed into root/seed-S (a fresh directory) and returns its row."""
    run_dir = root / f"seed-{seed}"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: remove it or pass another --root")
    cmd = [sys.executable, "-m", "grpo_lib", "train", "--preset", "cpu-tiny", "--run-dir", str(run_dir),
           "--set", f"seed={seed}"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    (root / f"seed-{seed}.out").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {out.returncode}); see {root / f'seed-{seed}.out'}:\n"
                         f"{out.stderr[-2000:]}")
    return row_of(seed, run_dir, out.stdout, seconds)


def row_of(seed: int, run_dir: Path, stdout: str, seconds: float) -> dict:
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    records = runlog.load_run_log(run_dir)
    correct = [r.metrics.get("reward/answer/mean", float("nan")) for r in records]
    first_09 = next((r.step for r, c in zip(records, correct) if c >= 0.9), None)
    findings = [f for f in diagnose(run_dir) if f.severity in ("problem", "warning")]
    live = sorted({f"{label.lower()}: {title}" for label, title in LIVE.findall(stdout)})
    return {"seed": seed, "before": before["accuracy"], "after": after["accuracy"],
            "format_after": after["format"], "steps": len(records), "first_step_0.9": first_09,
            "per_step_correct": [round(c, 3) for c in correct],
            "doctor_end": [f"{f.severity}: {f.title}" for f in findings], "doctor_live": live,
            "wall_s": round(seconds)}


def table(rows: list[dict]) -> str:
    lines = ["| seed | held-out correct before | after | first step with >= 0.9 sampled correct | "
             "live doctor (problem/warning) | doctor at the end (problem/warning) | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['first_step_0.9'] or 'never'} | "
                     f"{'; '.join(r['doctor_live']) or '-'} | {'; '.join(r['doctor_end']) or '-'} | "
                     f"{r['wall_s']} |")
    cleared = sum(r["after"] >= 0.9 for r in rows)
    lines.append(f"\n{cleared} of {len(rows)} seeds reach >= 0.9 held-out correct; after: min "
                 f"{min(r['after'] for r in rows):.3f}, median {sorted(r['after'] for r in rows)[len(rows) // 2]:.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--root", default=str(ROOT / "runs" / "seed_sweep"))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(s, root, threads, args.sets), args.seeds))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "threads_per_run": threads, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
