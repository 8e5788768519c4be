"""A run as the run doctor sees it: one column per metric over the steps, the reward functions with their
ranges and kinds, and derived per-step columns about the groups.

    view = load_run("runs/demo")   # a grpo_lib run dir or log.jsonl (config.json read beside it), a TRL output
                                   # dir or its trainer_state.json, or StepRecords

A TRL run is read from `trainer_state.json`'s `log_history` (the output dir's own, or its newest checkpoint's),
its metric names mapped to grpo_lib's through runlog.TRL_METRIC_NAMES (`reward` -> `reward/mean`, `kl` ->
`kl/mean`, `rewards/<fn>/mean` -> `reward/<fn>/mean`, ...). TRL writes no config.json: pass the run's config.

A reward function's range and kind (correctness, format, other) are what it declared (rewards.reward_declaration,
recorded in each StepRecord); for a log without declarations (older grpo_lib logs, TRL) the declaration of the
built-in reward of that name (rewards.REWARD_FUNCS), else a guess from the name. A range is widened to the values
the log shows.

Derived columns, per step:
    groups/saturated_frac  groups with zero reward variance whose completions are all correct
    groups/no_signal_frac  groups with zero reward variance that are not all correct
    groups/all_wrong_frac  groups with zero reward variance whose completions are all wrong
    groups/identical_frac  groups whose G completions are one and the same text (logs with completions only)
    var/<fn>               within-group variance of fn's weighted reward
"Correct" is every correctness reward that applies at the top of its range (EDGE_TOL), "wrong" every one at the
bottom; with no correctness reward, the weighted total at the top / bottom of its range. Exact from the
completions' rewards; from metrics alone (metrics-only logs, TRL) estimated from the means (estimated_groups).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runlog import LOG_NAME, RunDirError, StepRecord, TRL_METRIC_NAMES, read_log_lines, read_run_config

EDGE_TOL = 0.02  # a value within this share of its range from an end counts as at that end
TRL_STATE = "trainer_state.json"
FROM_TRL = {trl: ours for ours, trl in TRL_METRIC_NAMES.items()}

# Name fragments that mark an undeclared reward function as checking the format / the answer's correctness.
FORMAT_HINTS = ("format", "xml", "tag", "struct", "style", "regex", "syntax", "template")
CORRECTNESS_HINTS = ("answer", "correct", "accura", "acc", "math", "verif", "exact", "match", "solution", "equal",
                     "judge", "pass", "test")


@dataclass
class RunView:
    """What the checks read. cols: metric -> [steps] values, NaN where missing or not finite; logged: metric ->
    [steps] whether the step's log has the key at all (a NaN loss is logged, as null); ranges / kinds: per reward
    function; total_range: the range of the weighted total; source: "grpo_lib" or "trl"."""

    steps: np.ndarray
    cols: dict[str, np.ndarray]
    logged: dict[str, np.ndarray]
    config: dict
    reward_names: list[str]
    reward_weights: list[float]
    ranges: dict[str, tuple[float, float]]
    kinds: dict[str, str]
    total_range: tuple[float, float]
    source: str = "grpo_lib"

    def col(self, key: str) -> np.ndarray:
        return self.cols.get(key, np.full(len(self.steps), np.nan))

    def has(self, key: str) -> bool:
        return bool(np.isfinite(self.col(key)).any())

    def was_logged(self, key: str) -> np.ndarray:
        return self.logged.get(key, np.zeros(len(self.steps), dtype=bool))

    @property
    def n(self) -> int:
        return len(self.steps)

    def span(self, idx: slice | np.ndarray) -> tuple[int, int]:
        s = self.steps[idx]
        return (int(s.min()), int(s.max())) if len(s) else (0, 0)

    def of_kind(self, kind: str) -> list[str]:
        return [n for n in self.reward_names if self.kinds[n] == kind]


# ----------------------------------------------------------------------------------------------
# reading the step entries of a run
# ----------------------------------------------------------------------------------------------


def load_run(run, config=None) -> RunView:
    """The RunView of a run (see the module docstring). `config` (dict or GRPOConfig) overrides the config.json
    found beside a log."""
    entries, found, source = _entries_from(run)
    cfg = _config_dict(config) if config is not None else (found or {})
    steps = np.array([e["step"] for e in entries], dtype=float)
    keys = sorted({k for e in entries for k in e.get("metrics", {})})
    cols = {k: np.array([_num(e.get("metrics", {}).get(k)) for e in entries]) for k in keys}
    logged = {k: np.array([k in e.get("metrics", {}) for e in entries], dtype=bool) for k in keys}
    names, weights = _reward_functions(entries, cfg)
    ranges, kinds = _declarations(entries, names, cols)
    total_range = _total_range(names, weights, ranges)
    cols.update(_group_columns(entries, names, weights, cols, ranges, kinds, total_range))
    return RunView(steps, cols, logged, cfg, names, weights, ranges, kinds, total_range, source)


def _entries_from(run) -> tuple[list[dict], dict | None, str]:
    """(step entries as dicts sorted by step, a config found beside the log, source)."""
    if isinstance(run, (str, os.PathLike)):
        return _entries_from_path(Path(run))
    records = [run] if isinstance(run, StepRecord) else run
    return [_record_entry(r) for r in sorted(records, key=lambda r: r.step)], None, "grpo_lib"


def _entries_from_path(p: Path) -> tuple[list[dict], dict | None, str]:
    state = trl_state_path(p)
    log = p / LOG_NAME if p.is_dir() else p
    if state is not None and not log.exists():
        return trl_entries(state), read_run_config(state.parent) if p.is_file() else read_run_config(p), "trl"
    if not log.exists():
        raise RunDirError(f"no run log at {log}" + (f" and no TRL {TRL_STATE} in {p} or its checkpoint-*/"
                                                    if p.is_dir() else ""))
    entries, _ = read_log_lines(log)  # unreadable lines are skipped (runlog.load_run_log warns about them)
    return sorted(entries, key=lambda d: d["step"]), read_run_config(log.parent), "grpo_lib"


def _record_entry(r: StepRecord) -> dict:
    """The fields of a StepRecord the doctor reads (no per-token statistics)."""
    return {"step": r.step, "metrics": r.metrics, "total": r.total, "rewards": r.rewards,
            "reward_names": r.reward_names, "reward_weights": r.reward_weights, "reward_ranges": r.reward_ranges,
            "reward_kinds": r.reward_kinds, "num_generations": r.num_generations, "completions": r.completions}


def trl_state_path(p: Path) -> Path | None:
    """The trainer_state.json of a TRL output dir (its own or its newest checkpoint's: the one with the most
    steps), or p itself when it is one; None if there is none."""
    if p.is_file():
        return p if p.name == TRL_STATE else None
    candidates = [p / TRL_STATE, *p.glob(f"checkpoint-*/{TRL_STATE}")] if p.is_dir() else []
    found = [(_global_step(c), c) for c in candidates if c.is_file()]
    return max(found, key=lambda t: t[0])[1] if found else None


def _global_step(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("global_step", 0))
    except (OSError, ValueError, TypeError) as e:
        raise RunDirError(f"{path} is not a readable TRL trainer state ({e})") from e


def trl_entries(path: Path) -> list[dict]:
    """Step entries of TRL's log_history: the training logs (those with a loss or a reward; not the end-of-run
    summary or evaluations), metric names mapped to grpo_lib's (trl_to_grpo_name)."""
    history = json.loads(path.read_text()).get("log_history", [])
    entries = {}
    for h in history:
        if not isinstance(h, dict) or "step" not in h or not ({"loss", "reward"} & set(h)):
            continue
        entries[int(h["step"])] = {"step": int(h["step"]),
                                   "metrics": {trl_to_grpo_name(k): v for k, v in h.items() if k != "step"}}
    return [entries[s] for s in sorted(entries)]


def trl_to_grpo_name(key: str) -> str:
    """A TRL metric name -> grpo_lib's (rewards/<fn>/mean -> reward/<fn>/mean); unchanged where they agree."""
    if key.startswith("rewards/") and key.endswith("/mean"):
        return "reward/" + key[len("rewards/"):]
    return FROM_TRL.get(key, key)


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _num(x) -> float:
    try:
        return float("nan") if x is None else float(x)
    except (TypeError, ValueError):
        return float("nan")


# ----------------------------------------------------------------------------------------------
# the reward functions: names, weights, declared (or guessed) ranges and kinds
# ----------------------------------------------------------------------------------------------


def _reward_functions(entries: list[dict], cfg: dict) -> tuple[list[str], list[float]]:
    """Reward function names and weights: from the records, else the `reward/<fn>/mean` metrics and the config."""
    for e in reversed(entries):
        if e.get("reward_names"):
            weights = e.get("reward_weights") or [1.0] * len(e["reward_names"])
            return list(e["reward_names"]), [float(w) for w in weights]
    logged = dict.fromkeys(k for e in entries for k in e.get("metrics", {}))
    names = [m.group(1) for k in logged if (m := re.fullmatch(r"reward/(.+)/mean", k))]
    funcs, cw = [f for f in cfg.get("reward_funcs") or [] if isinstance(f, str)], cfg.get("reward_weights")
    names.sort(key=lambda n: funcs.index(n) if n in funcs else len(funcs))  # the config's order (TRL sorts keys)
    by_name = dict(zip(funcs, cw)) if cw and len(cw) == len(funcs) else {}
    return names, [float(by_name.get(n, 1.0)) for n in names]


def _declarations(entries, names, cols) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per function: its range (declared, widened to the values seen) and kind (see the module docstring)."""
    declared = _declared(entries, names)
    ranges, kinds = {}, {}
    for f, name in enumerate(names):
        span, kind = declared.get(name, (None, None))
        if span is None or kind is None:
            builtin_span, builtin_kind = builtin_declaration(name)
            span, kind = span or builtin_span, kind or builtin_kind or kind_from_name(name)
        lo, hi = span or (0.0, 1.0)
        seen = [_num(row[f]) for e in entries for row in e.get("rewards") or [] if f < len(row)]
        seen = [x for x in seen if math.isfinite(x)] or [x for x in cols.get(f"reward/{name}/mean", [])
                                                         if math.isfinite(x)]
        ranges[name], kinds[name] = (min([lo, *seen]), max([hi, *seen])), kind
    return ranges, kinds


def _declared(entries, names) -> dict[str, tuple]:
    """{name: ([low, high] or None, kind or None)} from the newest record that lists these functions."""
    for e in reversed(entries):
        if e.get("reward_names") == names and (e.get("reward_ranges") or e.get("reward_kinds")):
            spans = list(e.get("reward_ranges") or []) + [None] * len(names)
            kinds = list(e.get("reward_kinds") or []) + [None] * len(names)
            return {n: (tuple(spans[f]) if spans[f] else None, kinds[f]) for f, n in enumerate(names)}
    return {}


def builtin_declaration(name: str) -> tuple[tuple[float, float] | None, str | None]:
    """The declaration of grpo_lib's built-in reward function of this name (rewards.REWARD_FUNCS), for logs that
    carry none; (None, None) for other names."""
    from .rewards import REWARD_FUNCS, reward_declaration, reward_name  # torch: only for logs without declarations

    fn = next((f for f in REWARD_FUNCS.values() if reward_name(f) == name), None)
    span, kind = reward_declaration(fn) if fn is not None else (None, None)
    return (tuple(span) if span else None), kind


def kind_from_name(name: str) -> str:
    """A guess for an undeclared function: "format" or "correctness" from its name, else "other"."""
    low = name.lower()
    if any(h in low for h in FORMAT_HINTS):
        return "format"
    return "correctness" if any(h in low for h in CORRECTNESS_HINTS) else "other"


def _total_range(names, weights, ranges) -> tuple[float, float]:
    if not names:
        return 0.0, 1.0
    lo = sum(min(w * ranges[n][0], w * ranges[n][1]) for n, w in zip(names, weights))
    hi = sum(max(w * ranges[n][0], w * ranges[n][1]) for n, w in zip(names, weights))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def position(span: tuple[float, float], x: np.ndarray) -> np.ndarray:
    """Where x sits in [low, high], clipped to [0, 1]."""
    lo, hi = span
    return np.clip((np.asarray(x, dtype=float) - lo) / (hi - lo), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# derived columns: the groups of each step
# ----------------------------------------------------------------------------------------------

GROUP_COLUMNS = ("groups/saturated_frac", "groups/no_signal_frac", "groups/all_wrong_frac", "groups/identical_frac")


def _group_columns(entries, names, weights, cols, ranges, kinds, total_range) -> dict[str, np.ndarray]:
    """The derived columns of the module docstring: exact where a step has its completions' rewards."""
    n = len(entries)
    out = {k: np.full(n, np.nan) for k in GROUP_COLUMNS} | {f"var/{name}": np.full(n, np.nan) for name in names}
    for i, e in enumerate(entries):
        G = e.get("num_generations") or 0
        if e.get("total") and G >= 2:
            shares = exact_groups(e, names, weights, ranges, kinds, total_range)
        else:
            shares = estimated_groups({k: v[i] for k, v in cols.items()}, names, weights, ranges, kinds,
                                      total_range)
        for k, v in shares.items():
            out[k][i] = v
    return out


def exact_groups(e: dict, names, weights, ranges, kinds, total_range) -> dict[str, float]:
    """One logged step's group shares (GROUP_COLUMNS) and var/<fn>, from its completions' rewards."""
    G = e["num_generations"]
    total = np.array([_num(x) for x in e["total"]]).reshape(-1, G)  # [groups, G]
    rows = e.get("rewards") or [[] for _ in range(total.size)]
    per_fn = np.array([[_num(row[f]) if f < len(row) else np.nan for f in range(len(names))]
                       for row in rows]).reshape(len(total), G, len(names))  # [groups, G, F] (F may be 0)
    correct, wrong = _correct_and_wrong(total, per_fn, names, ranges, kinds, total_range)  # [groups, G] each
    alike = np.array([np.ptp(t[np.isfinite(t)]) == 0 if np.isfinite(t).any() else True for t in total])
    all_correct = alike & correct.all(axis=1)
    texts = e.get("completions") or []
    identical = ([len(set(texts[g * G:(g + 1) * G])) == 1 for g in range(len(total))]
                 if len(texts) == total.size else None)
    out = {"groups/saturated_frac": all_correct.mean(), "groups/no_signal_frac": (alike & ~all_correct).mean(),
           "groups/all_wrong_frac": (alike & wrong.all(axis=1)).mean(),
           "groups/identical_frac": np.mean(identical) if identical is not None else np.nan}
    for f, name in enumerate(names):
        out[f"var/{name}"] = _within_group_var(per_fn[:, :, f] * weights[f])
    return out


def _correct_and_wrong(total, per_fn, names, ranges, kinds, total_range) -> tuple[np.ndarray, np.ndarray]:
    """[groups, G] masks: every correctness reward that applies at its top / bottom (at least one applies);
    with no correctness reward, the total at the top / bottom of its range (unscorable: neither)."""
    idx = [f for f, n in enumerate(names) if kinds[n] == "correctness"]
    if not idx:
        pos = position(total_range, total)
        return np.isfinite(total) & (pos >= 1 - EDGE_TOL), np.isfinite(total) & (pos <= EDGE_TOL)
    pos = np.stack([position(ranges[names[f]], per_fn[:, :, f]) for f in idx], -1)  # [groups, G, C]
    applies = np.isfinite(per_fn[:, :, idx])
    some = applies.any(-1)
    return (some & np.where(applies, pos >= 1 - EDGE_TOL, True).all(-1),
            some & np.where(applies, pos <= EDGE_TOL, True).all(-1))


def _within_group_var(v: np.ndarray) -> float:
    """Mean over groups of the variance of the finite values of each group. v: [groups, G]."""
    per_group = [np.var(g[np.isfinite(g)]) for g in v if np.isfinite(g).sum() >= 2]
    return float(np.mean(per_group)) if per_group else float("nan")


def estimated_groups(m: dict, names, weights, ranges, kinds, total_range) -> dict[str, float]:
    """From one step's metrics: a saturated group has every correctness reward at its top, so the saturated share
    is at most the correctness means' lowest position p = (mean - low) / (high - low); estimate it as
    adv/zero_std_frac * p, the all-wrong share as adv/zero_std_frac * (1 - p) (both exact when every group has
    zero variance and the reward is 0/1), the rest of the zero-variance groups as no-signal. Without a correctness
    reward p is the mean total's position. A function's variance is bounded by w^2 (high - low)^2 p (1 - p),
    exact for 0/1 rewards."""
    zero = m.get("adv/zero_std_frac", float("nan"))
    positions = {name: float(position(ranges[name], m.get(f"reward/{name}/mean", np.nan)))
                 for name, w in zip(names, weights) if w != 0}
    judged = [positions[n] for n in names if n in positions and kinds[n] == "correctness"]
    p = min([x for x in judged if math.isfinite(x)],
            default=float(position(total_range, m.get("reward/mean", np.nan))))
    out = {"groups/saturated_frac": zero * p, "groups/no_signal_frac": zero * (1.0 - p),
           "groups/all_wrong_frac": zero * (1.0 - p), "groups/identical_frac": float("nan")}
    for name, w in zip(names, weights):
        q = positions.get(name, 0.5)
        out[f"var/{name}"] = (w * (ranges[name][1] - ranges[name][0])) ** 2 * q * (1 - q)
    return out
