"""StepRecord, the append-only run log, and the run directory's config.

A run directory holds:
    config.json             the GRPOConfig of the run (checked on resume)
    log.jsonl               one StepRecord per line, flushed and fsynced after every step
    log.dropped.jsonl       lines removed from log.jsonl by a resume (nothing is ever deleted)
    checkpoints/step-000010 adapter (peft format) + trainer_state.pt (grpo_lib.checkpoint)
    adapter/                the final LoRA adapter (peft format)

Resume policy: steps recorded after the last checkpoint are *dropped and redone*. Their lines move to
log.dropped.jsonl, so after a resume log.jsonl holds every completed step exactly once and the redone
steps are exactly the ones an uninterrupted run would have produced (RNG states are in the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

LOG_NAME = "log.jsonl"
DROPPED_NAME = "log.dropped.jsonl"


class RunDirError(RuntimeError):
    """A run directory is unusable; the message says which file and why."""


@dataclass
class StepRecord:
    """Everything one GRPO step saw and computed; lists are group-major: completion i is in group i // G."""

    step: int
    prompts: list[str]  # [groups] the formatted prompt text of each group
    completions: list[str]  # [N] decoded completion texts
    reward_names: list[str]  # [F]
    rewards: list[list[float | None]]  # [N, F] per-function rewards, None = does not apply
    reward_weights: list[float]  # [F]
    total: list[float | None]  # [N] weighted sum over functions that apply; None = unscorable
    advantages: list[float]  # [N]
    truncated: list[bool]  # [N] hit max_completion_length without EOS
    lengths: list[int]  # [N] completion tokens (EOS included)
    num_generations: int
    metrics: dict[str, float] = field(default_factory=dict)  # flat, "/"-separated keys
    columns: dict[str, list] = field(default_factory=dict)  # dataset column -> [groups] values ("prompt": raw)
    completion_ids: list[list[int]] = field(default_factory=list)  # [N][len] token ids (EOS included)
    tokens: list[list[str]] = field(default_factory=list)  # [N][len] token strings, for the inspector
    token_stats: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [N][len] (logp, ratio, kl)
    logged: dict[str, list] = field(default_factory=dict)  # column -> [N] values reward functions passed to log_extra
    reward_ranges: list = field(default_factory=list)  # [F] declared [low, high] of each function, or None
    reward_kinds: list = field(default_factory=list)  # [F] declared kind ("correctness", "format", "other") or None

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def answers(self) -> list:
        """[groups] gold answers (the dataset's "answer" column), [] if the task has none."""
        return self.columns.get("answer", [])

    def rows(self) -> list[dict]:
        """[groups] the dataset rows of the step (the "prompt" and other columns), for re-scoring. "prompt" is
        the raw prompt the trainer logs in columns (chat messages, as reward functions receive them), or the
        formatted prompt text where a record has none (one built by hand)."""
        return [{"prompt": self.prompts[g], **{k: v[g] for k, v in self.columns.items()}}
                for g in range(self.num_groups)]

    def group_slice(self, g: int) -> slice:
        G = self.num_generations
        return slice(g * G, (g + 1) * G)

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _finite(x):
    """JSON has no NaN/inf: write them as None (strict JSON that any reader can parse)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# the run log
# ----------------------------------------------------------------------------------------------


def append_record(run_dir: str | os.PathLike, record: StepRecord) -> None:
    """Append one line to run_dir/log.jsonl; flushed and fsynced so a crash loses at most this line."""
    path = Path(run_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record.to_dict(), separators=(",", ":"))
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log_lines(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Parse a jsonl run log. Returns (entries, problems); a corrupt or truncated line is skipped and
    described in problems (file, line number, why) instead of aborting the read."""
    entries, problems = [], []
    path = Path(path)
    if not path.exists():
        return entries, problems
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict) or not isinstance(d.get("step"), int):
                    raise ValueError("no integer 'step' field")
                entries.append(d)
            except ValueError as e:
                problems.append(f"{path}:{lineno}: unreadable run-log line skipped ({e}): {line[:80]!r}")
    return entries, problems


def load_run_log(run_dir_or_file: str | os.PathLike) -> list[StepRecord]:
    """The StepRecords of a run (a run directory or a log.jsonl path), ordered by step.
    Unreadable lines are skipped with a warning naming the file and line."""
    p = Path(run_dir_or_file)
    path = p / LOG_NAME if p.is_dir() else p
    if not path.exists():
        raise RunDirError(f"no run log at {path}")
    entries, problems = read_log_lines(path)
    for msg in problems:
        warnings.warn(msg, stacklevel=2)
    return sorted((StepRecord.from_dict(d) for d in entries), key=lambda r: r.step)


# grpo_lib's metric -> TRL GRPOTrainer's name for the same quantity (trl 1.16, same definition). Each step's
# metrics carry both names (trl_aliases), so a dashboard built for TRL runs reads ours and the run doctor reads
# TRL's trainer_state.json through the same table; the grpo_lib names stay, for readers of older logs.
TRL_METRIC_NAMES = {
    "reward/mean": "reward", "reward/std": "reward_std", "adv/zero_std_frac": "frac_reward_zero_std",
    "completion/mean_length": "completions/mean_length", "completion/truncated_frac": "completions/clipped_ratio",
    "kl/mean": "kl", "entropy/mean": "entropy", "clip/low": "clip_ratio/low_mean", "clip/high": "clip_ratio/high_mean",
    "clip/region": "clip_ratio/region_mean", "clip/cispo": "cispo_clip_ratio", "lr": "learning_rate",
}


def trl_metric_name(key: str) -> str | None:
    """TRL's name of a grpo_lib metric (reward/<fn>/mean -> rewards/<fn>/mean), None where TRL has none."""
    if key.startswith("reward/") and key.endswith("/mean") and key.count("/") >= 2 and key != "reward/mean":
        return "rewards/" + key[len("reward/"):]
    return TRL_METRIC_NAMES.get(key)


def trl_aliases(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that TRL also logs, under TRL's names: {TRL name: value}."""
    return {name: v for k, v in metrics.items() if (name := trl_metric_name(k))}


def metrics_table(records: list[StepRecord]) -> dict[str, list[float]]:
    """Column view of the metrics: {"step": [...], "reward/mean": [...], ...}; missing values are NaN."""
    keys = sorted({k for r in records for k in r.metrics})
    table = {"step": [float(r.step) for r in records]}
    for k in keys:
        table[k] = [float("nan") if r.metrics.get(k) is None else float(r.metrics[k]) for r in records]
    return table


def truncate_log_after(run_dir: str | os.PathLike, step: int) -> int:
    """Keep log lines with step <= `step` (the last checkpoint); move later ones, and unreadable lines,
    to log.dropped.jsonl. The log is rewritten atomically. Returns the number of lines moved."""
    run_dir = Path(run_dir)
    path = run_dir / LOG_NAME
    if not path.exists():
        return 0
    keep, drop, seen = [], [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                s = json.loads(line)["step"]
                ok = isinstance(s, int) and s <= step and s not in seen
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                seen.add(s)
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                drop.append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(run_dir / DROPPED_NAME, "a", encoding="utf-8") as f:
            f.writelines(drop)
            f.flush()
            os.fsync(f.fileno())
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(drop)


# ----------------------------------------------------------------------------------------------
# config of a run directory
# ----------------------------------------------------------------------------------------------


def latest_run(root: str | os.PathLike, prefix: str = "") -> Path | None:
    """The most recently modified run directory under `root` whose name starts with `prefix` and that holds
    a config.json (a run that started); None if there is none."""
    root = Path(root)
    runs = [d for d in root.glob(f"{prefix}*") if (d / "config.json").is_file()] if root.is_dir() else []
    return max(runs, key=lambda d: (d / "config.json").stat().st_mtime, default=None)


def write_run_config(run_dir: str | os.PathLike, config_dict: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "config.json", json.dumps(config_dict, indent=1, sort_keys=True))


def read_run_config(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); restore it or start a new run directory") from e


# Fields that may differ between the original run and its resume without changing what is learned.
RESUMABLE_CHANGES = {"max_steps", "save_steps", "save_total_limit", "num_eval_prompts", "reward_timeout_s",
                     "max_skipped_steps"}


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
    """{field: (old, new)} for fields that differ, ignoring RESUMABLE_CHANGES."""
    keys = (set(old) | set(new)) - RESUMABLE_CHANGES
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
