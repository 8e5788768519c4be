"""The run doctor: reads a run's per-step metrics and says what is wrong, why, and what to change.

    findings = diagnose("runs/demo")           # a run dir, a log.jsonl, StepRecords or a metrics table
    print(format_findings(findings))           # or: python -m grpo_lib doctor runs/demo

Each check answers a question GRPO users keep asking. They compare the *first* and the *last* part of the
run (windows of WINDOW_FRAC of the steps, medians: robust to a noisy step) or use a robust slope
(Theil-Sen), and the run's config.json where there is one (num_iterations, beta, loss_type,
max_completion_length, reward weights, saturation_threshold):

    loss_zero         "my loss is 0" (or "my loss goes up"): with num_iterations=1 the ratio is exactly 1 and the
                      group advantages have zero mean, so the policy-gradient term's *value* is ~0 by
                      construction (its gradient is not); the loss is about beta * KL. Info, not a problem.
    no_signal         most groups have zero reward variance below the best reward (all fail, or all equally
                      wrong): no advantage, no gradient. Denser reward, easier prompts, temperature, larger G.
    saturation        most groups are all-correct (zero variance at the maximum): training has nothing left to
                      learn from these prompts. Stop (saturation_threshold), harder prompts, dynamic_sampling.
    format_not_answer a format-like reward rose (or sits at its top) while the correctness reward is flat or
                      falling: the model learned the cheap reward, not the task.
    kl_growth         KL to the reference still climbing at the end of the run, or very high.
    length            truncated completions frequent / rising, or the mean length drifting to
                      max_completion_length.
    entropy_collapse  mean token entropy (entropy/mean) fell steeply: sampling turns deterministic, groups
                      become identical and lose variance.
    clipping          high clip fractions (only meaningful at num_iterations > 1): the policy moves too far per
                      generation batch, the learning rate is too high for that many updates.
    reward_dominance  one reward function carries almost all of the reward variance (the thing advantages are
                      made of) while another function varies but is drowned by its weight or scale.
    unscorable        many completions no reward function applies to: advantage 0, wasted samples.
    nonfinite         NaN/inf in the loss, gradient norm or KL.
    grad_spikes       gradient-norm spikes far above the run's median; and how often clipping acts.
    reward_decline    the mean reward fell from the first to the last part of the run.
    reward_flat       learning signal present but the reward does not move (info).

Where reward levels matter (all-fail vs all-correct), rewards are placed in their range: a built-in reward
function's known range (KNOWN_REWARD_RANGES), otherwise [min(0, lowest seen), max(1, highest seen)], weighted
and summed over the functions. With full StepRecords the doctor classifies each zero-variance group exactly
(its common total at the top of the range = saturated); from metrics alone it estimates the split from the
mean reward's position in that range.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .runlog import LOG_NAME, RunDirError, StepRecord, read_log_lines, read_run_config

# ----------------------------------------------------------------------------------------------
# thresholds, documented once
# ----------------------------------------------------------------------------------------------

WINDOW_FRAC = 0.25  # the first / last window is this share of the run's steps ...
MIN_WINDOW = 3  # ... and at least this many steps
MIN_LEVEL_STEPS = 3  # checks of a level (share of zero-variance groups, truncation, ...) need this many steps
MIN_TREND_STEPS = 8  # checks of a change (first vs last window, slopes) need this many steps
EDGE_TOL = 0.02  # a group's total within this share of the reward range from the top counts as "at the maximum"

LOSS_ZERO_ABS = 0.01  # median |loss| (or |loss - beta*KL|, the policy term) below this reads as "0"
GRAD_ZERO = 1e-6  # median grad_norm below this: the gradient itself is 0 (nothing moves)
NO_SIGNAL_WARN, NO_SIGNAL_PROBLEM = 0.5, 0.8  # share of groups with zero variance below the maximum (last window)
SATURATED_INFO = 0.5  # share of groups all-correct (last window median) worth a note
SATURATED_STEP = 0.9  # a step is saturated at this share (config's saturation_threshold if set) ...
SATURATED_WARN_STEPS = 5  # ... and this many saturated steps in a row at the end of the run make it a warning
FORMAT_RISE = 0.2  # format reward rose by this share of its range, first -> last window ...
ANSWER_FLAT = 0.05  # ... while the answer reward moved by less than this share (or fell)
FORMAT_TOP, ANSWER_LOW = 0.9, 0.1  # or: format at >= 90% of its range while answers stay <= 10%
KL_WARN, KL_PROBLEM = 0.1, 1.0  # per-token KL (nats) to the reference, last-window median
KL_GROWTH = 2.0  # "growing": last-window KL >= this times the KL at mid-run, and a positive late slope
TRUNC_WARN, TRUNC_PROBLEM = 0.2, 0.5  # share of truncated completions (last window median)
TRUNC_RISE = 0.1  # truncated share rose by this much: "rising"; fell by 2x this: improving (info)
LENGTH_NEAR_LIMIT = 0.8  # mean length at this share of max_completion_length ...
LENGTH_DRIFT = 1.2  # ... after growing by this factor: drifting to the limit
ENTROPY_COLLAPSE = 0.3  # entropy/mean last window <= this times the first window: collapse
CONVERGED_SHARE = 0.05  # reward within this share of its range from the top: low entropy is convergence (info)
ENTROPY_FLOOR = 0.02  # nats per token: sampling is practically deterministic
CLIP_WARN, CLIP_PROBLEM = 0.1, 0.3  # clip/region median (share of tokens), at num_iterations > 1
DOMINANCE_SHARE = 0.9  # one function carries this share of the reward variance ...
DROWNED_SPREAD = 0.2  # ... while another varies (its std >= this share of its range) but barely counts
UNSCORABLE_WARN, UNSCORABLE_PROBLEM = 0.1, 0.5  # share of unscorable completions (last window median)
GRAD_SPIKE = 10.0  # grad_norm above this times the run's median is a spike
CLIPPED_MOST = 0.5  # grad_norm above max_grad_norm on this share of steps: clipping acts on most updates
REWARD_DROP = 0.2  # mean reward fell by this share of its range, first -> last window
REWARD_FLAT = 0.05  # reward moved by less than this share of its range over a run with signal

# Known ranges of the built-in reward functions (grpo_lib.rewards.REWARD_FUNCS), per completion, unweighted.
KNOWN_REWARD_RANGES = {"format": (0.0, 1.0), "answer": (0.0, 1.0), "xml_count": (0.0, 0.5),
                       "length": (0.0, 1.0), "consistency": (0.0, 1.0)}
# Name fragments that mark a reward function as checking the format / the correctness of the answer.
FORMAT_HINTS = ("format", "xml", "tag", "struct", "style", "regex", "syntax", "template")
ANSWER_HINTS = ("answer", "correct", "accura", "acc", "math", "verif", "exact", "match", "solution", "equal",
                "judge", "pass", "test")

SEVERITIES = ("info", "warning", "problem")  # in increasing order


@dataclass
class Finding:
    """One diagnosis. `check` is a stable id (see the module docstring), `steps` the first and last step of the
    evidence, `figures` the numbers behind it (for tests, dashboards, JSON)."""

    check: str
    severity: str  # "info" | "warning" | "problem"
    title: str
    evidence: str
    advice: str
    steps: tuple[int, int] | None = None
    figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# reading a run
# ----------------------------------------------------------------------------------------------


@dataclass
class RunView:
    """What the checks read: steps, metric columns (NaN where missing), the config (maybe {}), the reward
    functions with their weights and ranges, and the reward range of the weighted total."""

    steps: np.ndarray
    cols: dict[str, np.ndarray]
    config: dict
    reward_names: list[str]
    reward_weights: list[float]
    ranges: dict[str, tuple[float, float]]
    total_range: tuple[float, float]

    def col(self, key: str) -> np.ndarray:
        return self.cols.get(key, np.full(len(self.steps), np.nan))

    def has(self, key: str) -> bool:
        return bool(np.isfinite(self.col(key)).any())

    @property
    def n(self) -> int:
        return len(self.steps)

    def span(self, idx: slice | np.ndarray) -> tuple[int, int]:
        s = self.steps[idx]
        return (int(s.min()), int(s.max())) if len(s) else (0, 0)


def _entries_from(run) -> tuple[list[dict], dict | None]:
    """(step entries as dicts, config found next to the log) from a run dir, a log path or StepRecords."""
    if isinstance(run, (str, os.PathLike)):
        p = Path(run)
        path = p / LOG_NAME if p.is_dir() else p
        if not path.exists():
            raise RunDirError(f"no run log at {path}")
        entries, _ = read_log_lines(path)  # unreadable lines are skipped (load_run_log warns about them)
        return sorted(entries, key=lambda d: d["step"]), read_run_config(p if p.is_dir() else p.parent)
    if isinstance(run, StepRecord):
        run = [run]
    return [_record_entry(r) for r in sorted(run, key=lambda r: r.step)], None


def _record_entry(r: StepRecord) -> dict:
    """The fields of a StepRecord the doctor reads (no texts, no per-token stats)."""
    return {"step": r.step, "metrics": r.metrics, "total": r.total, "rewards": r.rewards,
            "reward_names": r.reward_names, "reward_weights": r.reward_weights, "num_generations": r.num_generations}


def _config_dict(config) -> dict:
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def load_run(run, config=None) -> RunView:
    """A RunView of a run directory / log.jsonl path (config.json read from beside it), StepRecords, or a
    metrics table {"step": [...], "reward/mean": [...], ...}. `config` (dict or GRPOConfig) overrides."""
    if isinstance(run, dict):
        entries = [{"step": int(s), "metrics": {k: v[i] for k, v in run.items() if k != "step"}}
                   for i, s in enumerate(run["step"])]
        found = None
    else:
        entries, found = _entries_from(run)
    cfg = _config_dict(config) if config is not None else (found or {})
    steps = np.array([e["step"] for e in entries], dtype=float)
    keys = sorted({k for e in entries for k in e.get("metrics", {})})
    cols = {k: np.array([_num(e.get("metrics", {}).get(k)) for e in entries]) for k in keys}
    names, weights = _reward_functions(entries, keys, cfg)
    ranges = _reward_ranges(entries, names, cols)
    total_range = _total_range(names, weights, ranges)
    cols.update(_group_columns(entries, names, weights, cols, ranges, total_range))
    return RunView(steps, cols, cfg, names, weights, ranges, total_range)


def _num(x) -> float:
    try:
        return float("nan") if x is None else float(x)
    except (TypeError, ValueError):
        return float("nan")


def _reward_functions(entries: list[dict], keys: list[str], cfg: dict) -> tuple[list[str], list[float]]:
    """Reward function names and weights: from the records, else the `reward/<fn>/mean` metrics and the config."""
    for e in reversed(entries):
        if e.get("reward_names"):
            weights = e.get("reward_weights") or [1.0] * len(e["reward_names"])
            return list(e["reward_names"]), [float(w) for w in weights]
    names = [m.group(1) for k in keys if (m := re.fullmatch(r"reward/(.+)/mean", k))]
    funcs, cw = list(cfg.get("reward_funcs") or []), cfg.get("reward_weights")
    by_name = dict(zip(funcs, cw)) if cw and len(cw) == len(funcs) else {}
    return names, [float(by_name.get(n, 1.0)) for n in names]


def _reward_ranges(entries, names, cols) -> dict[str, tuple[float, float]]:
    """Per function: its known range widened to what was seen, else [min(0, lowest), max(1, highest)]."""
    out = {}
    for f, name in enumerate(names):
        seen = [_num(row[f]) for e in entries for row in e.get("rewards") or [] if f < len(row)]
        means = cols.get(f"reward/{name}/mean", [])
        seen = [x for x in seen if math.isfinite(x)] or [x for x in means if math.isfinite(x)]
        lo, hi = KNOWN_REWARD_RANGES.get(name, (0.0, 1.0))
        out[name] = (min([lo, *seen]), max([hi, *seen]))
    return out


def _total_range(names, weights, ranges) -> tuple[float, float]:
    if not names:
        return 0.0, 1.0
    lo = sum(min(w * ranges[n][0], w * ranges[n][1]) for n, w in zip(names, weights))
    hi = sum(max(w * ranges[n][0], w * ranges[n][1]) for n, w in zip(names, weights))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _position(view_range: tuple[float, float], x: np.ndarray) -> np.ndarray:
    lo, hi = view_range
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _group_columns(entries, names, weights, cols, ranges, total_range) -> dict[str, np.ndarray]:
    """Derived per-step columns:
    groups/saturated_frac, groups/no_signal_frac: zero-variance groups at / below the top of the reward range;
    var/<fn>: within-group variance of each function's weighted reward.
    Exact from the completions' rewards; from metrics alone, estimated (_estimate_from_means)."""
    n = len(entries)
    out = {"groups/saturated_frac": np.full(n, np.nan), "groups/no_signal_frac": np.full(n, np.nan),
           **{f"var/{name}": np.full(n, np.nan) for name in names}}
    for i, e in enumerate(entries):
        G = e.get("num_generations") or 0
        if e.get("total") and G >= 2:
            sat, nosig = _classify_groups(e["total"], G, total_range)
            var = {name: _within_group_var([_num(row[f]) * weights[f] if f < len(row) else float("nan")
                                            for row in e.get("rewards") or []], G) for f, name in enumerate(names)}
        else:
            sat, nosig, var = _estimate_from_means({k: v[i] for k, v in cols.items()}, names, weights, ranges,
                                                   total_range)
        out["groups/saturated_frac"][i], out["groups/no_signal_frac"][i] = sat, nosig
        for name, v in var.items():
            out[f"var/{name}"][i] = v
    return out


def _estimate_from_means(m: dict, names, weights, ranges, total_range) -> tuple[float, float, dict]:
    """From one step's metrics: a saturated group has every function at its top, so the saturated share is at
    most the lowest function's position p_f = (mean_f - lo_f) / (hi_f - lo_f): estimate it as
    adv/zero_std_frac * min_f p_f, the rest of the zero-variance groups as no-signal. A function's variance
    is bounded by w^2 (hi - lo)^2 p (1 - p), exact for 0/1 rewards."""
    zero = m.get("adv/zero_std_frac", float("nan"))
    positions = {name: float(_position(ranges[name], np.array(m.get(f"reward/{name}/mean", np.nan))))
                 for name, w in zip(names, weights) if w != 0}
    top = min([p for p in positions.values() if math.isfinite(p)],
              default=float(_position(total_range, np.array(m.get("reward/mean", np.nan)))))
    var = {name: (w * (ranges[name][1] - ranges[name][0])) ** 2 * p * (1 - p)
           for name, w in zip(names, weights) for p in [positions.get(name, 0.5)]}
    return zero * top, zero * (1.0 - top), var


def _classify_groups(total: list, G: int, total_range) -> tuple[float, float]:
    """Shares of groups with zero variance at the top of the reward range (saturated) and below it."""
    t = np.array([_num(x) for x in total]).reshape(-1, G)
    top = total_range[1] - EDGE_TOL * (total_range[1] - total_range[0])
    sat = nosig = 0
    for g in t:
        g = g[np.isfinite(g)]
        if len(g) >= 2 and g.max() != g.min():
            continue
        if len(g) and g.min() >= top:
            sat += 1
        else:
            nosig += 1
    return sat / len(t), nosig / len(t)


def _within_group_var(values: list[float], G: int) -> float:
    v = np.array(values, dtype=float).reshape(-1, G)
    per_group = [np.var(g[np.isfinite(g)]) for g in v if np.isfinite(g).sum() >= 2]
    return float(np.mean(per_group)) if per_group else float("nan")


# ----------------------------------------------------------------------------------------------
# robust statistics
# ----------------------------------------------------------------------------------------------


def _windows(n: int) -> tuple[slice, slice]:
    """The first and the last window of a run of n steps."""
    k = max(MIN_WINDOW, round(n * WINDOW_FRAC))
    return slice(0, min(k, n)), slice(max(0, n - k), n)


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


def theil_sen(steps: np.ndarray, values: np.ndarray) -> float:
    """Median of the pairwise slopes (per step): a trend that one outlying step cannot swing."""
    ok = np.isfinite(values)
    s, v = steps[ok], values[ok]
    if len(s) < 3:
        return float("nan")
    i, j = np.triu_indices(len(s), k=1)
    dx = s[j] - s[i]
    keep = dx != 0
    return float(np.median((v[j] - v[i])[keep] / dx[keep])) if keep.any() else float("nan")


def _trailing_streak(flags: np.ndarray) -> int:
    """How many steps in a row, counting back from the last, have flag True."""
    count = 0
    for f in flags[::-1]:
        if not f:
            break
        count += 1
    return count


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _steps_text(span: tuple[int, int]) -> str:
    return f"step {span[0]}" if span[0] == span[1] else f"steps {span[0]}-{span[1]}"


def _first_last(view: RunView, key: str) -> tuple[float, float, slice, slice]:
    first, last = _windows(view.n)
    x = view.col(key)
    return _median(x[first]), _median(x[last]), first, last


def _num_iterations(view: RunView) -> int:
    """From the config; else inferred: ratios to the old policy differ from 1 only when num_iterations > 1."""
    if "num_iterations" in view.config:
        return int(view.config["num_iterations"])
    ratio = view.col("ratio/mean")
    ratio = ratio[np.isfinite(ratio)]
    return 2 if len(ratio) and np.abs(ratio - 1.0).max() > 1e-6 else 1


# ----------------------------------------------------------------------------------------------
# the checks: each returns a list of findings (empty when all is well)
# ----------------------------------------------------------------------------------------------


def check_loss_zero(view: RunView) -> list[Finding]:
    if view.n < MIN_LEVEL_STEPS or not view.has("loss") or _num_iterations(view) != 1:
        return []
    loss = view.col("loss")
    beta = float(view.config.get("beta", 0.0 if not view.has("kl/mean") else float("nan")))
    beta_kl = beta * np.nan_to_num(view.col("kl/mean"), nan=0.0)  # the KL term (0 where KL is not logged)
    policy_term = _median(np.abs(loss - beta_kl)) if math.isfinite(beta) else _median(np.abs(loss))
    if not policy_term < LOSS_ZERO_ABS:
        return []
    med = _median(np.abs(loss))
    title = ("Loss ~ 0 is expected here (num_iterations=1)" if med < LOSS_ZERO_ABS else
             "The loss is just beta * KL here (num_iterations=1): it follows the KL, not the reward")
    grad = _median(view.col("grad_norm"))
    grad_note = (f" Here even the gradient is ~0 (median grad_norm {_fmt(grad)}): no group has reward variance and "
                 "the policy is still at its reference, so nothing moves; see the zero-variance finding."
                 if grad < GRAD_ZERO else "")
    loss_type = view.config.get("loss_type", "grpo")
    token_note = (f" With loss_type='{loss_type}' the policy term is a token mean, so long completions weigh more "
                  "and it is small but not exactly 0.") if loss_type in ("bnpo", "dapo") else ""
    return [Finding(
        "loss_zero", "info", title,
        f"median |loss| {_fmt(med)} over {view.n} steps; median beta*KL {_fmt(_median(beta_kl))}; median "
        f"|loss - beta*KL| {_fmt(policy_term)}.",
        "Not a bug. With one update per generation batch the ratio to the old policy is exactly 1 and each group's "
        "advantages have zero mean, so the policy-gradient term's value is ~0 by construction; its gradient is "
        "not 0. What is left is beta * KL." + token_note + " Judge learning by reward/mean, adv/abs_mean and "
        "grad_norm, not by the loss." + grad_note,
        view.span(slice(None)), {"loss_abs_median": med, "beta_kl_median": _median(beta_kl),
                                 "policy_term_median": policy_term})]


def check_no_signal(view: RunView) -> list[Finding]:
    if view.n < MIN_LEVEL_STEPS:
        return []
    _, last = _windows(view.n)
    share = _median(view.col("groups/no_signal_frac")[last])
    if not share >= NO_SIGNAL_WARN:
        return []
    pos = _median(_position(view.total_range, view.col("reward/mean"))[last])
    reward = _median(view.col("reward/mean")[last])
    at_min = pos <= EDGE_TOL
    title = ("Reward stuck at its minimum: no learning signal" if at_min else
             "Most groups have zero reward variance below the best reward: little learning signal")
    return [Finding(
        "no_signal", "problem" if share >= NO_SIGNAL_PROBLEM else "warning", title,
        f"{_steps_text(view.span(last))}: median {share:.0%} of groups have all G completions scored alike below "
        f"the maximum; mean reward {_fmt(reward)} (range {_fmt(view.total_range[0])}..{_fmt(view.total_range[1])}).",
        "A group whose completions all score the same has advantage 0 for every member: no gradient. Give partial "
        "credit (a denser reward, e.g. xml_count or a format reward next to the answer reward), use easier "
        "prompts (a curriculum), raise temperature for more diverse samples, or raise num_generations (G) so a "
        "rare success shows up in the group. Check with the completion inspector that the reward function "
        "really scores what the model writes (answer extraction, gold answers).",
        view.span(last), {"no_signal_frac": share, "reward_mean": reward, "reward_position": pos})]


def check_saturation(view: RunView) -> list[Finding]:
    if view.n < MIN_LEVEL_STEPS:
        return []
    _, last = _windows(view.n)
    sat = view.col("groups/saturated_frac")
    share = _median(sat[last])
    threshold = view.config.get("saturation_threshold") or SATURATED_STEP
    streak = _trailing_streak(np.nan_to_num(sat, nan=0.0) >= threshold)
    if not (share >= SATURATED_INFO or streak >= SATURATED_WARN_STEPS):
        return []
    warn = streak >= SATURATED_WARN_STEPS
    span = view.span(slice(view.n - streak, view.n)) if warn else view.span(last)
    stopper = ("saturation_threshold is set: the run stops on its own after saturation_patience such steps"
               if view.config.get("saturation_threshold") else
               "set saturation_threshold=0.9 (with saturation_patience) to stop the run automatically")
    evidence = (f"{_steps_text(span)} ({streak} steps in a row, to the end): >= {threshold:.0%} of groups had every "
                f"completion at the top reward; " if warn else "")
    evidence += (f"in {_steps_text(view.span(last))} a median {share:.0%} of groups were all-correct; mean reward "
                 f"{_fmt(_median(view.col('reward/mean')[last]))} of at most {_fmt(view.total_range[1])}.")
    return [Finding(
        "saturation", "warning" if warn else "info",
        "Saturated: groups are all-correct, nothing left to learn from these prompts" if warn else
        "Mostly saturated: most groups are all-correct", evidence,
        f"All-correct groups have zero advantage, so these steps cost compute and teach nothing. The training "
        f"reward is maxed: stop and evaluate on held-out prompts; {stopper}; move to harder prompts; or turn on "
        f"dynamic_sampling=True to resample until a step has informative groups.",
        span, {"saturated_frac": share, "saturated_streak": float(streak)})]


def _kind(name: str) -> str | None:
    low = name.lower()
    if any(h in low for h in FORMAT_HINTS):
        return "format"
    if any(h in low for h in ANSWER_HINTS):
        return "answer"
    return None


def check_format_not_answer(view: RunView) -> list[Finding]:
    fmt = [n for n in view.reward_names if _kind(n) == "format"]
    ans = [n for n in view.reward_names if _kind(n) == "answer"]
    if view.n < MIN_TREND_STEPS or not fmt or not ans:
        return []
    out = []
    for a in ans:
        a0, a1, first, last = _first_last(view, f"reward/{a}/mean")
        a_lo, a_hi = view.ranges[a]
        a_change, a_pos = (a1 - a0) / (a_hi - a_lo), (a1 - a_lo) / (a_hi - a_lo)
        for f in fmt:
            f0, f1, _, _ = _first_last(view, f"reward/{f}/mean")
            f_lo, f_hi = view.ranges[f]
            rise, f_pos = (f1 - f0) / (f_hi - f_lo), (f1 - f_lo) / (f_hi - f_lo)
            rose = rise >= FORMAT_RISE and a_change < ANSWER_FLAT
            stuck = f_pos >= FORMAT_TOP and a_pos <= ANSWER_LOW and abs(a_change) < ANSWER_FLAT
            if not (rose or stuck) or not (math.isfinite(rise) and math.isfinite(a_change)):
                continue
            out.append(Finding(
                "format_not_answer", "warning", f"'{f}' reward {'rose' if rose else 'is maxed'} but '{a}' "
                f"(correctness) did not follow",
                f"{_steps_text(view.span(first))} -> {_steps_text(view.span(last))}: {f} {_fmt(f0)} -> {_fmt(f1)}, "
                f"{a} {_fmt(a0)} -> {_fmt(a1)} (window medians).",
                "The model learned the cheap reward (the output format) but not the task. Check that the answer "
                "reward can be earned at all (inspect the best completions and the gold answers; an extraction bug "
                "looks exactly like this), lower the format weight once the format is learned, make correctness "
                "the main reward (e.g. only pay format when the answer parses), use easier prompts or a stronger "
                "model, and raise G or temperature so correct answers appear in groups.",
                (view.span(first)[0], view.span(last)[1]),
                {f"{f}_first": f0, f"{f}_last": f1, f"{a}_first": a0, f"{a}_last": a1}))
    return out


def check_kl(view: RunView) -> list[Finding]:
    if view.n < MIN_TREND_STEPS or not view.has("kl/mean"):
        return []
    kl = view.col("kl/mean")
    _, last = _windows(view.n)
    k = max(MIN_WINDOW, round(view.n * WINDOW_FRAC))
    mid = slice(max(0, view.n // 2 - k // 2), view.n // 2 - k // 2 + k)
    kl_mid, kl_last = _median(kl[mid]), _median(kl[last])
    half = slice(view.n // 2, view.n)
    slope = theil_sen(view.steps[half], kl[half])
    growing = slope > 0 and kl_last >= KL_GROWTH * kl_mid
    if kl_last >= KL_PROBLEM:
        severity = "problem" if growing else "warning"
    elif growing and kl_last >= KL_WARN:
        severity = "warning"
    else:
        return []
    beta = view.config.get("beta")
    return [Finding(
        "kl_growth", severity,
        "KL to the reference is growing without bound" if growing else "KL to the reference is very high",
        f"KL per token: {_fmt(kl_mid)} at mid-run ({_steps_text(view.span(mid))}) -> {_fmt(kl_last)} in "
        f"{_steps_text(view.span(last))}; late slope {_fmt(slope)}/step"
        + (f"; beta={beta}." if beta is not None else "."),
        "The policy keeps moving away from the reference. Lower the learning rate, "
        + ("set beta > 0 (0.01-0.04) so something pulls it back" if beta == 0 else
           "raise beta (e.g. 0.04 -> 0.1) to pull it back")
        + ", keep max_grad_norm at 1.0, and look for reward hacking: colour the completions by KL "
        "in the completion inspector and read the tokens that drifted (repetition, odd formatting that games the "
        "reward).",
        view.span(last), {"kl_mid": kl_mid, "kl_last": kl_last, "kl_slope": slope})]


def check_length(view: RunView) -> list[Finding]:
    out = []
    if view.n >= MIN_LEVEL_STEPS and view.has("completion/truncated_frac"):
        t0, t1, first, last = _first_last(view, "completion/truncated_frac")
        if t1 >= TRUNC_WARN:
            rising = view.n >= MIN_TREND_STEPS and t1 - t0 >= TRUNC_RISE
            improving = view.n >= MIN_TREND_STEPS and t0 - t1 >= 2 * TRUNC_RISE
            severity = "info" if improving else "problem" if t1 >= TRUNC_PROBLEM else "warning"
            out.append(Finding(
                "length", severity, "Truncated completions are " + ("rising" if rising else
                                                                    "falling but still frequent" if improving else
                                                                    "frequent"),
                f"truncated share {_fmt(t0)} in {_steps_text(view.span(first))} -> {_fmt(t1)} in "
                f"{_steps_text(view.span(last))}" + _limit_text(view) + ".",
                _LENGTH_ADVICE, view.span(last), {"truncated_first": t0, "truncated_last": t1}))
    limit = view.config.get("max_completion_length")
    if limit and view.n >= MIN_TREND_STEPS and view.has("completion/mean_length") and not out:
        l0, l1, first, last = _first_last(view, "completion/mean_length")
        if l1 >= LENGTH_NEAR_LIMIT * limit and l1 >= LENGTH_DRIFT * l0:
            out.append(Finding(
                "length", "warning", "Completion length is drifting to the limit",
                f"mean length {_fmt(l0)} -> {_fmt(l1)} tokens ({_steps_text(view.span(first))} -> "
                f"{_steps_text(view.span(last))}); max_completion_length={limit}.",
                _LENGTH_ADVICE, view.span(last), {"length_first": l0, "length_last": l1, "limit": float(limit)}))
    return out


_LENGTH_ADVICE = ("A truncated completion usually has no final answer and is scored as a failure, and the length "
                  "keeps growing when long completions are not penalised. Raise max_completion_length if the task "
                  "needs the room; otherwise add a length penalty or DAPO-style overlong shaping, prefer "
                  "loss_type='dr_grpo' or 'dapo' (the 'grpo' per-sequence mean favours long wrong answers), and "
                  "look for repetition loops in the truncated completions (completion inspector, filter "
                  "'truncated').")


def _limit_text(view: RunView) -> str:
    limit = view.config.get("max_completion_length")
    length = _median(view.col("completion/mean_length")[_windows(view.n)[1]])
    return f"; mean length {_fmt(length)} of max_completion_length={limit}" if limit else ""


def check_entropy(view: RunView) -> list[Finding]:
    if view.n < MIN_TREND_STEPS or not view.has("entropy/mean"):
        return []
    e0, e1, first, last = _first_last(view, "entropy/mean")
    collapsed = e0 > 0 and e1 <= ENTROPY_COLLAPSE * e0
    if not (collapsed or e1 < ENTROPY_FLOOR):
        return []
    low, high = view.total_range
    reward = _median(view.col("reward/mean")[last])
    if reward >= high - CONVERGED_SHARE * (high - low):  # the reward is maxed: determinism is convergence
        return [Finding(
            "entropy_collapse", "info", "Entropy fell as the policy converged on the maximal reward",
            f"mean token entropy {_fmt(e0)} in {_steps_text(view.span(first))} -> {_fmt(e1)} nats in "
            f"{_steps_text(view.span(last))}, while the mean reward was {_fmt(reward)} of at most {_fmt(high)}.",
            "Expected once the task is solved: the policy answers the same way every time. Nothing more is "
            "learned from these prompts (see saturation); harder prompts, or stop.",
            (view.span(first)[0], view.span(last)[1]), {"entropy_first": e0, "entropy_last": e1})]
    return [Finding(
        "entropy_collapse", "problem" if e1 < ENTROPY_FLOOR else "warning", "Entropy collapse",
        f"mean token entropy {_fmt(e0)} in {_steps_text(view.span(first))} -> {_fmt(e1)} nats in "
        f"{_steps_text(view.span(last))}.",
        "The policy has become (nearly) deterministic: the G completions of a group become identical, their "
        "rewards equal, and the learning signal disappears. Lower the learning rate, raise temperature, use "
        "clip-higher (epsilon_high=0.28, DAPO) at num_iterations > 1, or raise beta. If the reward is already "
        "maxed this is convergence: stop the run.",
        (view.span(first)[0], view.span(last)[1]), {"entropy_first": e0, "entropy_last": e1})]


def check_clipping(view: RunView) -> list[Finding]:
    if view.n < MIN_LEVEL_STEPS or not view.has("clip/region") or _num_iterations(view) <= 1:
        return []
    clip = _median(view.col("clip/region"))
    if not clip >= CLIP_WARN:
        return []
    mu = view.config.get("num_iterations", "> 1")
    return [Finding(
        "clipping", "problem" if clip >= CLIP_PROBLEM else "warning", "High clip fraction",
        f"median clip/region {clip:.1%} of tokens over {view.n} steps (num_iterations={mu}, epsilon="
        f"{view.config.get('epsilon', 'n/a')}).",
        "Many tokens' ratio to the sampling policy left [1 - epsilon, 1 + epsilon] within one generation batch: "
        "the policy moves too far per batch and the clip throws their gradient away. Lower the learning rate or "
        "num_iterations; clip-higher (epsilon_high=0.28) helps only the upper side.",
        view.span(slice(None)), {"clip_region_median": clip})]


def check_reward_dominance(view: RunView) -> list[Finding]:
    if view.n < MIN_LEVEL_STEPS or len(view.reward_names) < 2:
        return []
    var = {n: float(np.nansum(view.col(f"var/{n}"))) for n in view.reward_names}
    total = sum(var.values())
    if not total > 0:
        return []
    top = max(var, key=var.get)
    share = var[top] / total
    drowned = []
    for n, w in zip(view.reward_names, view.reward_weights):
        if n == top or w == 0:
            continue
        lo, hi = view.ranges[n]
        spread = math.sqrt(var[n] / view.n) / abs(w) / (hi - lo)  # unweighted std / range
        if spread >= DROWNED_SPREAD:
            drowned.append(n)
    if share < DOMINANCE_SHARE or not drowned:
        return []
    weights = dict(zip(view.reward_names, view.reward_weights))
    return [Finding(
        "reward_dominance", "warning", f"'{top}' dominates the reward signal",
        f"'{top}' carries {share:.0%} of the reward variance over the run while {', '.join(map(repr, drowned))} "
        f"varies too but barely counts; weights {weights}, ranges "
        f"{ {n: tuple(round(v, 3) for v in r) for n, r in view.ranges.items()} }.",
        "Advantages are z-scores of the weighted total, so a function with a large weight or a wide scale decides "
        "which completion wins and the others are ignored. Rescale the functions to similar ranges or set "
        "reward_weights so each one's weighted spread matches its importance (the reward playground shows the "
        "effect on a logged step).",
        view.span(slice(None)), {"share": share, **{f"var/{n}": v for n, v in var.items()}})]


def check_unscorable(view: RunView) -> list[Finding]:
    if view.n < MIN_LEVEL_STEPS or not view.has("reward/unscorable_frac"):
        return []
    _, last = _windows(view.n)
    share = _median(view.col("reward/unscorable_frac")[last])
    if not share >= UNSCORABLE_WARN:
        return []
    return [Finding(
        "unscorable", "problem" if share >= UNSCORABLE_PROBLEM else "warning", "Many completions are unscorable",
        f"median {share:.0%} of completions in {_steps_text(view.span(last))} had no reward function that applies "
        f"(every function returned None).",
        "An unscorable completion gets advantage 0: it is sampled and then ignored. Check that the dataset has the "
        "columns the reward functions read (e.g. a gold 'answer' for every row) and that the functions return 0.0, "
        "not None, for a wrong completion.",
        view.span(last), {"unscorable_frac": share})]


def check_nonfinite(view: RunView) -> list[Finding]:
    out = []
    for key in ("loss", "grad_norm", "kl/mean"):
        x = view.col(key)
        if not np.isfinite(x).any():
            continue  # never logged (e.g. kl at beta=0)
        bad = view.steps[~np.isfinite(x)]
        if len(bad):
            out.append(Finding(
                "nonfinite", "problem", f"Non-finite {key}",
                f"{key} is NaN/inf at {len(bad)} step(s): {', '.join(str(int(s)) for s in bad[:10])}"
                f"{' ...' if len(bad) > 10 else ''}.",
                "The update diverged (or fp16 overflowed). Lower the learning rate, keep max_grad_norm > 0, use "
                "dtype bfloat16 or float32 rather than float16, and resume from the checkpoint before the first bad "
                "step.", (int(bad.min()), int(bad.max())), {"count": float(len(bad))}))
    return out


def check_grad_norm(view: RunView) -> list[Finding]:
    if view.n < MIN_TREND_STEPS or not view.has("grad_norm"):
        return []
    g = view.col("grad_norm")
    med = _median(g)
    out = []
    if med > 0:
        spikes = view.steps[np.nan_to_num(g, nan=0.0) > GRAD_SPIKE * med]
        if len(spikes):
            out.append(Finding(
                "grad_spikes", "warning", "Gradient-norm spikes",
                f"grad_norm above {GRAD_SPIKE:g}x the run's median ({_fmt(med)}) at step(s) "
                f"{', '.join(str(int(s)) for s in spikes[:10])}; largest {_fmt(float(np.nanmax(g)))}.",
                "A spike is one batch pushing the policy hard (often a rare high-advantage completion, or numerics). "
                "Keep max_grad_norm (1.0) so the update is clipped, lower the learning rate if spikes repeat, and "
                "inspect the completions of those steps.", (int(spikes.min()), int(spikes.max())),
                {"grad_norm_median": med, "spikes": float(len(spikes))}))
    max_norm = view.config.get("max_grad_norm")
    if max_norm:
        clipped = float(np.mean(np.nan_to_num(g, nan=0.0) > max_norm))
        if clipped >= CLIPPED_MOST:
            out.append(Finding(
                "grad_spikes", "info", "Gradient clipping acts on most updates",
                f"grad_norm > max_grad_norm={max_norm} on {clipped:.0%} of steps (median {_fmt(med)}).",
                "Each update is rescaled to norm max_grad_norm, so the learning rate is effectively lower than set. "
                "Fine for stability; if learning is slow, the learning rate (not clipping) is the knob.",
                view.span(slice(None)), {"clipped_frac": clipped, "grad_norm_median": med}))
    return out


def check_reward_trend(view: RunView) -> list[Finding]:
    if view.n < MIN_TREND_STEPS or not view.has("reward/mean"):
        return []
    r0, r1, first, last = _first_last(view, "reward/mean")
    lo, hi = view.total_range
    change = (r1 - r0) / (hi - lo)
    span = (view.span(first)[0], view.span(last)[1])
    text = f"mean reward {_fmt(r0)} in {_steps_text(view.span(first))} -> {_fmt(r1)} in {_steps_text(view.span(last))}"
    if change <= -REWARD_DROP:
        return [Finding(
            "reward_decline", "warning", "Reward fell during training", text + f" (range {_fmt(lo)}..{_fmt(hi)}).",
            "The policy got worse on its own reward: usually a learning rate too high (watch KL and grad_norm), "
            "or a collapse after reward hacking. Lower the learning rate, raise beta, and resume from an earlier "
            "checkpoint.", span, {"reward_first": r0, "reward_last": r1})]
    quiet = _median(view.col("groups/no_signal_frac")[last]) < NO_SIGNAL_WARN
    unsaturated = _median(view.col("groups/saturated_frac")[last]) < SATURATED_INFO
    if abs(change) < REWARD_FLAT and quiet and unsaturated and (r1 - lo) / (hi - lo) < 1 - EDGE_TOL:
        return [Finding(
            "reward_flat", "info", "Reward is not moving", text + " although groups do have reward variance.",
            "There is signal but no progress yet: give it more steps, or raise the learning rate (LoRA: 1e-5..1e-4 "
            "and up to 2e-4 for small models), and check adv/abs_mean and grad_norm are not ~0.",
            span, {"reward_first": r0, "reward_last": r1})]
    return []


CHECKS = (check_nonfinite, check_no_signal, check_saturation, check_format_not_answer, check_kl, check_length,
          check_entropy, check_clipping, check_reward_dominance, check_unscorable, check_grad_norm,
          check_reward_trend, check_loss_zero)


def diagnose(run, config=None) -> list[Finding]:
    """Findings for a run (a run directory, a log.jsonl path, StepRecords or a metrics table), most severe first.
    `config` (dict or GRPOConfig) is read from the run directory's config.json when not given."""
    view = run if isinstance(run, RunView) else load_run(run, config)
    if view.n == 0:
        return []
    findings = [f for check in CHECKS for f in check(view)]
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

LABELS = {"info": "info", "warning": "WARNING", "problem": "PROBLEM"}
COLOURS = {"info": "#1f77b4", "warning": "#d97706", "problem": "#c62828"}


def format_findings(findings: list[Finding], width: int = 100) -> str:
    """Findings as terminal text: a summary line, then one block per finding (severity, title, evidence, advice)."""
    counts = [f"{n} {s}" for s in reversed(SEVERITIES) if (n := sum(f.severity == s for f in findings))]
    blocks = ["run doctor: " + (f"{len(findings)} finding(s): {', '.join(counts)}" if findings else
                                "no findings: nothing looks wrong")]
    for f in findings:
        blocks.append(f"[{LABELS[f.severity]}] {f.title}\n{_wrapped('evidence', f.evidence, width)}\n"
                      f"{_wrapped('advice', f.advice, width)}")
    return "\n".join(blocks)


def _wrapped(label: str, text: str, width: int) -> str:
    return textwrap.fill(text, width, initial_indent=f"    {label}: ", subsequent_indent=" " * (6 + len(label)))


def findings_html(findings: list[Finding]) -> str:
    """Findings as HTML (escaped) for the dashboard and its static view."""
    if not findings:
        return '<div class="grpo-doctor"><b>run doctor:</b> nothing looks wrong so far</div>'
    items = "".join(
        f'<li style="margin-bottom:4px"><b style="color:{COLOURS[f.severity]}">{LABELS[f.severity]}</b> '
        f"<b>{html.escape(f.title)}</b><br><small>{html.escape(f.evidence)}</small><br>"
        f"<small><i>{html.escape(f.advice)}</i></small></li>" for f in findings)
    return f'<div class="grpo-doctor"><b>run doctor</b><ul style="margin:2px 0">{items}</ul></div>'


def findings_json(findings: list[Finding]) -> str:
    return json.dumps([f.to_dict() for f in findings], indent=1)
