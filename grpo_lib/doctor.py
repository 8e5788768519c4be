"""The run doctor: reads a run's per-step metrics and says what is wrong, why, and what to change.

    findings = diagnose("runs/demo")           # a run dir, a log.jsonl, a TRL output dir or StepRecords
    print(format_findings(findings))           # or: python -m grpo_lib doctor runs/demo

The run is read into a runview.RunView (metric columns, the reward functions' ranges and kinds, the groups of
each step). Each check answers a question GRPO users keep asking. They compare the *first* and the *last* part
of the run (windows of WINDOW_FRAC of the steps, medians: robust to a noisy step) or use a robust slope
(Theil-Sen), and the run's config.json where there is one (num_iterations, beta, learning_rate, loss_type,
max_completion_length, reward weights, saturation_threshold, max_skipped_steps):

    nonfinite         NaN/inf in the loss, gradient norm or KL (in fp16: an overflow).
    fp16_overflow     the GradScaler skipped optimiser steps repeatedly (amp/step_skipped): fp16 overflowed.
    destroyed         a run that started with some reward was wrecked by its updates: the reward fell to its
                      minimum with the KL or the truncated share blowing up. The update is too large.
    no_signal         most groups have zero reward variance below the best reward, and the run is neither
                      destroyed nor collapsed ("from the start" when its first steps had no signal either: never
                      learned): denser reward, easier prompts, temperature, larger G.
    collapse          most groups had a reward spread at the start and now have none, with groups that are not
                      all-correct among them, and sampling turned deterministic (entropy fell, or the G
                      completions are copies): the policy answers alike whether right or wrong (a shortcut). Not
                      saturation.
    saturation        most groups are all-correct (zero variance, every correctness reward at its top): nothing
                      left to learn from these prompts. Stop (saturation_threshold), harder prompts.
    format_not_answer a format reward rose (or sits at its top) while the correctness reward is flat or falling.
    kl_growth         KL to the reference still climbing at the end of the run, or very high.
    length            truncated completions frequent / rising, or the mean length drifting to the limit.
    entropy_collapse  mean token entropy fell steeply (info when the reward is maxed: convergence).
    clipping          high clip fractions (only meaningful at num_iterations > 1).
    reward_dominance  one reward function carries almost all of the reward variance while another one varies
                      but is drowned by its weight or scale.
    unscorable        many completions no reward function applies to: advantage 0, wasted samples.
    grad_spikes       gradient-norm spikes far above the run's median; and how often clipping acts.
    reward_decline    the mean reward fell from the first to the last part of the run (check "reward_trend").
    reward_flat       learning signal present but the reward does not move (info; check "reward_trend").
    loss_zero         "my loss is 0": with num_iterations=1 the policy-gradient term's *value* is ~0 by
                      construction (its gradient is not); the loss is about beta * KL. Info.

A check runs when the run has the steps and the metrics it needs (REQUIREMENTS); checks_not_run says which did
not and why (a TRL run logs no unscorable share, a run at beta=0 no KL, ...).
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field

import numpy as np

from .runlog import trl_metric_name
from .runview import EDGE_TOL, RunView, load_run, position

# ----------------------------------------------------------------------------------------------
# thresholds, documented once
# ----------------------------------------------------------------------------------------------

WINDOW_FRAC = 0.25  # the first / last window is this share of the run's steps ...
MIN_WINDOW = 3  # ... and at least this many steps
MIN_LEVEL_STEPS = 3  # checks of a level (share of zero-variance groups, truncation, ...) need this many steps
MIN_TREND_STEPS = 8  # checks of a change (first vs last window, slopes) need this many steps

LOSS_ZERO_ABS = 0.01  # median |loss| (or |loss - beta*KL|, the policy term) below this reads as "0"
GRAD_ZERO = 1e-6  # median grad_norm below this: the gradient itself is 0 (nothing moves)
NO_SIGNAL_WARN, NO_SIGNAL_PROBLEM = 0.5, 0.8  # share of groups with zero variance below the maximum (last window)
MOST = 0.5  # "most groups" means more than this share
COLLAPSE_STUCK = 0.2  # collapse: at least this share of the zero-variance groups is not all-correct (last window)
SATURATED_STEP = 0.9  # a step is saturated at this share (config's saturation_threshold if set) ...
SATURATED_WARN_STEPS = 5  # ... and this many saturated steps in a row at the end of the run make it a warning
DESTROYED_START = 0.25  # destroyed: the reward sat at >= this share of its range before the break ...
DESTROYED_LOW = 0.05  # ... and at <= this share from the break on
FORMAT_RISE = 0.2  # format reward rose by this share of its range, first -> last window ...
ANSWER_FLAT = 0.05  # ... while the correctness reward moved by less than this share (or fell)
FORMAT_TOP, ANSWER_LOW = 0.9, 0.1  # or: format at >= 90% of its range while correctness stays <= 10%
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
SKIPS_WARN = 2  # fp16: this many skipped optimiser steps is an overflow that repeats, not the scale's calibration
SKIPS_IN_A_ROW = 3  # ... this many in a row (config's max_skipped_steps if set) is a problem
GRAD_SPIKE = 10.0  # grad_norm above this times the run's median is a spike
CLIPPED_MOST = 0.5  # grad_norm above max_grad_norm on this share of steps: clipping acts on most updates
REWARD_DROP = 0.2  # mean reward fell by this share of its range, first -> last window
REWARD_FLAT = 0.05  # reward moved by less than this share of its range over a run with signal

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
# robust statistics
# ----------------------------------------------------------------------------------------------


def _windows(n: int) -> tuple[slice, slice]:
    """The first and the last window of a run of n steps."""
    k = max(MIN_WINDOW, round(n * WINDOW_FRAC))
    return slice(0, min(k, n)), slice(max(0, n - k), n)


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if len(x) else float("nan")


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


def _longest_streak(flags: np.ndarray) -> int:
    best = count = 0
    for f in flags:
        count = count + 1 if f else 0
        best = max(best, count)
    return best


def _num_text(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _steps_text(span: tuple[int, int]) -> str:
    return f"step {span[0]}" if span[0] == span[1] else f"steps {span[0]}-{span[1]}"


def _step_list(steps: np.ndarray) -> str:
    return ", ".join(str(int(s)) for s in steps[:10]) + (" ..." if len(steps) > 10 else "")


def _first_last(view: RunView, key: str) -> tuple[float, float, slice, slice]:
    first, last = _windows(view.n)
    x = view.col(key)
    return _median(x[first]), _median(x[last]), first, last


def _num_iterations(view: RunView) -> int:
    """From the config; else inferred: ratios to the old policy differ from 1, and the clip removes tokens, only
    when num_iterations > 1."""
    if "num_iterations" in view.config:
        return int(view.config["num_iterations"])
    ratio, clip = view.col("ratio/mean"), view.col("clip/region")
    moved = np.abs(ratio[np.isfinite(ratio)] - 1.0).max(initial=0.0) > 1e-6
    return 2 if moved or np.nan_to_num(clip).max(initial=0.0) > 0 else 1


def _zero_variance(view: RunView) -> np.ndarray:
    """[steps] share of groups with zero reward variance (all-correct or not)."""
    return view.col("groups/saturated_frac") + view.col("groups/no_signal_frac")


def _learning_rate(view: RunView, i: int) -> float:
    """The configured learning rate; without a config, the one logged at step index i."""
    lr = view.config.get("learning_rate")
    return float(lr) if lr is not None else float(view.col("lr")[i])


def _fp16(view: RunView) -> bool:
    """Loss scaling was on (the logged loss scale is not 1): the run computed in fp16."""
    scale = view.col("amp/loss_scale")
    return bool(np.any(np.isfinite(scale) & (scale != 1.0)))


# ----------------------------------------------------------------------------------------------
# what a check needs: steps and metrics (one of them logged)
# ----------------------------------------------------------------------------------------------

REQUIREMENTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "nonfinite": (1, ("loss", "grad_norm", "kl/mean")),
    "fp16_overflow": (1, ("amp/step_skipped",)),
    "destroyed": (MIN_LEVEL_STEPS, ("reward/mean",)),
    "no_signal": (MIN_LEVEL_STEPS, ("adv/zero_std_frac",)),
    "collapse": (MIN_LEVEL_STEPS, ("adv/zero_std_frac",)),
    "saturation": (MIN_LEVEL_STEPS, ("adv/zero_std_frac",)),
    "format_not_answer": (MIN_TREND_STEPS, ("reward/mean",)),
    "kl_growth": (MIN_TREND_STEPS, ("kl/mean",)),
    "length": (MIN_LEVEL_STEPS, ("completion/truncated_frac", "completion/mean_length")),
    "entropy_collapse": (MIN_TREND_STEPS, ("entropy/mean",)),
    "clipping": (MIN_LEVEL_STEPS, ("clip/region",)),
    "reward_dominance": (MIN_LEVEL_STEPS, ("reward/mean",)),
    "unscorable": (MIN_LEVEL_STEPS, ("reward/unscorable_frac",)),
    "grad_spikes": (MIN_TREND_STEPS, ("grad_norm",)),
    "reward_trend": (MIN_TREND_STEPS, ("reward/mean",)),
    "loss_zero": (MIN_LEVEL_STEPS, ("loss",)),
}
"""check -> (steps it needs, metrics of which at least one must be logged). Group shares come from the
completions' rewards when the log has them, else from adv/zero_std_frac (estimated)."""


def _missing(view: RunView, check: str) -> str | None:
    """Why `check` cannot run on this view, or None if it can."""
    steps, keys = REQUIREMENTS[check]
    exact_groups = check in ("no_signal", "collapse", "saturation") and view.has("groups/saturated_frac")
    if exact_groups or any(view.was_logged(k).any() for k in keys):
        return f"needs {steps} steps, the run has {view.n}" if view.n < steps else None
    if "kl/mean" in keys and view.config.get("beta") == 0:
        return "beta=0: no KL term, no KL logged"
    names = " or ".join(keys)
    if view.source == "trl":
        trl = [t for k in keys if (t := trl_metric_name(k))]
        return (f"TRL logged no {' or '.join(trl)}" if trl else f"TRL logs no counterpart of {names}")
    return f"{names} not in the log"


def _can_run(view: RunView, check: str) -> bool:
    return _missing(view, check) is None


def checks_not_run(view: RunView) -> dict[str, str]:
    """{check: why it could not run} for this run (too few steps, a metric not logged)."""
    return {check: why for check in REQUIREMENTS if (why := _missing(view, check))}


# ----------------------------------------------------------------------------------------------
# patterns more than one check must agree on: a run wrecked by its updates, a collapsed policy
# ----------------------------------------------------------------------------------------------


def breakdown(view: RunView) -> dict | None:
    """The run started with a reward (median position >= DESTROYED_START before step index b) and from index b
    on sits at its minimum (position <= DESTROYED_LOW at b and in the median after), with a sign of a violent
    update from b on: KL >= KL_PROBLEM, truncated share >= TRUNC_PROBLEM, or a non-finite loss. Returns the
    figures ({"break": b, ...}) or None."""
    if not _can_run(view, "destroyed"):
        return None
    pos = position(view.total_range, view.col("reward/mean"))
    for b in range(1, view.n):
        before, after = _median(pos[:b]), _median(pos[b:])
        if not (pos[b] <= DESTROYED_LOW and after <= DESTROYED_LOW and before >= DESTROYED_START):
            continue
        kl = float(np.nanmax(view.col("kl/mean")[b:], initial=np.nan)) if view.has("kl/mean") else float("nan")
        trunc = _median(view.col("completion/truncated_frac")[b:])
        nan_loss = bool((view.was_logged("loss")[b:] & ~np.isfinite(view.col("loss")[b:])).any())
        if kl >= KL_PROBLEM or trunc >= TRUNC_PROBLEM or nan_loss:
            return {"break": b, "reward_before": _median(view.col("reward/mean")[:b]),
                    "reward_after": _median(view.col("reward/mean")[b:]), "kl_max_after": kl,
                    "truncated_after": trunc, "nan_loss": float(nan_loss)}
        return None
    return None


def collapse(view: RunView) -> dict | None:
    """The policy turned deterministic whether right or wrong: in the last window most groups have zero reward
    variance (window means, so the parts add up) and at least COLLAPSE_STUCK of those are *not* all-correct,
    while in the first window most groups varied; and the sampling became deterministic (entropy fell to
    ENTROPY_COLLAPSE of its start or below ENTROPY_FLOOR, or most groups are G copies of one completion).
    Returns the figures or None; a wrecked run (breakdown) is not a collapse."""
    if not _can_run(view, "collapse") or breakdown(view):
        return None
    first, last = _windows(view.n)
    zero = _zero_variance(view)
    z0, z1 = _mean(zero[first]), _mean(zero[last])
    sat, stuck = _mean(view.col("groups/saturated_frac")[last]), _mean(view.col("groups/no_signal_frac")[last])
    e0, e1 = _median(view.col("entropy/mean")[first]), _median(view.col("entropy/mean")[last])
    identical = _mean(view.col("groups/identical_frac")[last])
    deterministic = e1 <= ENTROPY_COLLAPSE * e0 or e1 < ENTROPY_FLOOR or identical > MOST
    if first.stop > last.start or not (z1 > MOST and stuck >= COLLAPSE_STUCK * z1 and z0 < NO_SIGNAL_WARN
                                       and deterministic):
        return None
    return {"zero_first": z0, "zero_last": z1, "saturated_last": sat, "stuck_last": stuck,
            "all_wrong_last": _mean(view.col("groups/all_wrong_frac")[last]), "identical_last": identical,
            "entropy_first": e0, "entropy_last": e1}


# ----------------------------------------------------------------------------------------------
# the checks: each returns a list of findings (empty when all is well)
# ----------------------------------------------------------------------------------------------


def check_nonfinite(view: RunView) -> list[Finding]:
    if not _can_run(view, "nonfinite"):
        return []
    bad = {k: view.steps[view.was_logged(k) & ~np.isfinite(view.col(k))] for k in ("loss", "grad_norm", "kl/mean")}
    bad = {k: s for k, s in bad.items() if len(s)}
    if not bad:
        return []
    steps = np.unique(np.concatenate(list(bad.values())))
    fp16 = _fp16(view)
    advice = ("In fp16 (loss scaling is on) a NaN/inf loss is an overflow: an activation or logit above fp16's "
              "65504, which Qwen2-family models are known to reach. Use dtype='bfloat16' on a GPU that has it "
              "(Ampere or newer) or dtype='float32' (on a T4: slower, but exact); a lower learning rate only helps "
              "when the overflow grew with training. " if fp16 else
              "The update diverged (or an fp16 forward overflowed). Lower the learning rate, keep max_grad_norm "
              "> 0, use dtype bfloat16 or float32 rather than float16. ")
    return [Finding(
        "nonfinite", "problem", f"Non-finite {', '.join(bad)}" + (" (fp16)" if fp16 else ""),
        "; ".join(f"{k} is NaN/inf at {len(s)} step(s): {_step_list(s)}" for k, s in bad.items()) + ".",
        advice + "Resume from the checkpoint before the first bad step.",
        (int(steps.min()), int(steps.max())), {f"count/{k}": float(len(s)) for k, s in bad.items()})]


def check_fp16_overflow(view: RunView) -> list[Finding]:
    if not _can_run(view, "fp16_overflow"):
        return []
    skipped = np.nan_to_num(view.col("amp/step_skipped")) >= 0.5
    count, in_a_row = int(skipped.sum()), _longest_streak(skipped)
    if count < SKIPS_WARN:
        return []
    limit = view.config.get("max_skipped_steps") or SKIPS_IN_A_ROW
    scale = view.col("amp/loss_scale")
    lowest = float(np.nanmin(scale, initial=np.nan)) if view.has("amp/loss_scale") else float("nan")
    bad = view.steps[skipped]
    return [Finding(
        "fp16_overflow", "problem" if in_a_row >= limit or count >= MOST * view.n else "warning",
        f"fp16 overflow: {count} optimiser steps skipped",
        f"the GradScaler skipped the update at {count} of {view.n} steps ({_step_list(bad)}), at most {in_a_row} "
        f"in a row; loss scale {_num_text(scale[0])} at step {int(view.steps[0])} -> {_num_text(scale[-1])} at step "
        f"{int(view.steps[-1])} (lowest {_num_text(lowest)}).",
        "A skipped step is one whose fp16 gradients held inf/NaN: the generation batch was sampled and scored for "
        "nothing. The GradScaler halves the scale at each skip, so skips that repeat, or a scale that falls "
        "below 1, mean values overflow fp16 (65504) in the forward or backward, not a scale still calibrating. "
        "Use dtype='bfloat16' on a GPU that has it (Ampere or newer) or dtype='float32', lower the learning rate, "
        "keep max_grad_norm at 1.0, and look for NaN losses (a forward overflow); max_skipped_steps stops such "
        "a run.", (int(bad.min()), int(bad.max())),
        {"skipped": float(count), "skipped_in_a_row": float(in_a_row), "loss_scale_lowest": lowest})]


def check_destroyed(view: RunView) -> list[Finding]:
    found = breakdown(view)
    if found is None:
        return []
    b = found["break"]
    step, lr = int(view.steps[b]), _learning_rate(view, b)
    lo, hi = view.total_range
    signs = [f"KL per token up to {_num_text(found['kl_max_after'])}" if found["kl_max_after"] >= KL_PROBLEM else "",
             f"a median {found['truncated_after']:.0%} of completions truncated"
             if found["truncated_after"] >= TRUNC_PROBLEM else "", "a NaN loss" if found["nan_loss"] else ""]
    beta, max_norm = view.config.get("beta"), view.config.get("max_grad_norm")
    return [Finding(
        "destroyed", "problem", f"The updates wrecked the policy at step {step} (learning_rate={lr:g})",
        f"mean reward {_num_text(found['reward_before'])} before step {step} -> {_num_text(found['reward_after'])} "
        f"from step {step} on (range {_num_text(lo)}..{_num_text(hi)}), with {', '.join(s for s in signs if s)}; "
        f"step {step}'s completions were sampled after {b} update(s) at learning_rate={lr:g}"
        + (f", beta={beta}" if beta is not None else "") + (f", max_grad_norm={max_norm}" if max_norm else "")
        + ".",
        "The task was within reach (the steps before it scored); the update size broke the policy, not the prompts. "
        "Lower learning_rate 10x or more (LoRA: 1e-5..2e-4; full fine-tuning 1e-6..1e-5) or add warmup_steps; "
        "raise beta (e.g. 0.04 -> 0.1) so the KL term holds the policy near its reference; keep max_grad_norm at "
        "1.0 (it tames a spike, but Adam's first updates move each weight by about learning_rate whatever the "
        "gradient's size, so the learning rate is the knob). Restart, or resume from a checkpoint before step "
        f"{step}.", (int(view.steps[0]), int(view.steps[-1])), {**found, "learning_rate": lr})]


def check_no_signal(view: RunView) -> list[Finding]:
    if not _can_run(view, "no_signal") or breakdown(view) or collapse(view):
        return []
    first, last = _windows(view.n)
    share = _median(view.col("groups/no_signal_frac")[last])
    if not share >= NO_SIGNAL_WARN:
        return []
    pos = _median(position(view.total_range, view.col("reward/mean"))[last])
    reward = _median(view.col("reward/mean")[last])
    never = _median(_zero_variance(view)[first]) >= NO_SIGNAL_WARN
    title = ("Reward stuck at its minimum: no learning signal" if pos <= EDGE_TOL else
             "Most groups have zero reward variance below the best reward: little learning signal")
    return [Finding(
        "no_signal", "problem" if share >= NO_SIGNAL_PROBLEM else "warning",
        title + (" from the start" if never else ""),
        f"{_steps_text(view.span(last))}: median {share:.0%} of groups have all G completions scored alike below "
        f"the maximum; mean reward {_num_text(reward)} (range {_num_text(view.total_range[0])}.."
        f"{_num_text(view.total_range[1])})" + (f"; the same in {_steps_text(view.span(first))}." if never else "."),
        "A group whose completions all score the same has advantage 0 for every member: no gradient. Give partial "
        "credit (a denser reward, e.g. xml_count or a format reward next to the answer reward), use easier "
        "prompts (a curriculum), raise temperature for more diverse samples, or raise num_generations (G) so a "
        "rare success shows up in the group. Check with the completion inspector that the reward function "
        "really scores what the model writes (answer extraction, gold answers).",
        view.span(last), {"no_signal_frac": share, "reward_mean": reward, "reward_position": pos})]


def check_collapse(view: RunView) -> list[Finding]:
    found = collapse(view)
    if found is None:
        return []
    first, last = _windows(view.n)
    identical = found["identical_last"]
    entropy = (f" Mean token entropy {_num_text(found['entropy_first'])} -> {_num_text(found['entropy_last'])} "
               f"nats." if math.isfinite(found["entropy_last"]) else "")
    return [Finding(
        "collapse", "problem" if found["zero_last"] >= NO_SIGNAL_PROBLEM else "warning",
        "Collapse: most groups' completions score alike, right or wrong (not saturation)",
        f"{_steps_text(view.span(last))}: on average {found['zero_last']:.0%} of groups had zero reward variance "
        f"({_steps_text(view.span(first))}: {found['zero_first']:.0%}), {found['saturated_last']:.0%} of groups "
        f"all-correct and {found['stuck_last']:.0%} not ({found['all_wrong_last']:.0%} all-wrong)"
        + (f"; {identical:.0%} of groups were G copies of one completion" if math.isfinite(identical) else "")
        + f".{entropy} Mean reward {_num_text(_median(view.col('reward/mean')[last]))} of at most "
        f"{_num_text(view.total_range[1])}.",
        "The policy now answers each prompt the same way whether that is right or wrong (a shortcut, e.g. always "
        "the first number): the all-correct groups are where the shortcut happens to be right, not a solved "
        "task, and no group of either kind has a gradient. The updates were too large for this run: lower the "
        f"learning rate (learning_rate={_learning_rate(view, view.n - 1):g}), raise beta so the KL term pulls the "
        "policy back, raise temperature to keep the samples diverse. A run can climb out of such a dip with more "
        "steps; judge it on held-out prompts against the task's shortcut baseline, not on the training reward.",
        (view.span(first)[0], view.span(last)[1]), found)]


def check_saturation(view: RunView) -> list[Finding]:
    if not _can_run(view, "saturation") or collapse(view):
        return []
    _, last = _windows(view.n)
    sat = view.col("groups/saturated_frac")
    share = _median(sat[last])
    threshold = view.config.get("saturation_threshold") or SATURATED_STEP
    streak = _trailing_streak(np.nan_to_num(sat, nan=0.0) >= threshold)
    warn = streak >= SATURATED_WARN_STEPS
    if not (share > MOST or warn):
        return []
    span = view.span(slice(view.n - streak, view.n)) if warn else view.span(last)
    reward = _median(view.col("reward/mean")[last])
    lo, hi = view.total_range
    maxed = reward >= hi - CONVERGED_SHARE * (hi - lo)
    stopper = ("saturation_threshold is set: the run stops on its own after saturation_patience such steps"
               if view.config.get("saturation_threshold") else
               "set saturation_threshold=0.9 (with saturation_patience) to stop the run automatically")
    top = "all-correct" if view.of_kind("correctness") else "all at the top reward"  # no correctness reward: top
    evidence = (f"{_steps_text(span)} ({streak} steps in a row, to the end): >= {threshold:.0%} of groups were "
                f"{top}; " if warn else "")
    evidence += (f"in {_steps_text(view.span(last))} a median {share:.0%} of groups were {top}; mean reward "
                 f"{_num_text(reward)} of at most {_num_text(hi)}.")
    return [Finding(
        "saturation", "warning" if warn else "info",
        f"Saturated: groups are {top}, nothing left to learn from these prompts" if warn else
        f"{'Saturated' if share >= threshold else 'Mostly saturated'}: {share:.0%} of groups are {top}", evidence,
        "A group whose G completions score alike has zero advantage, so these steps cost compute and teach "
        "nothing. "
        + ("The training reward is maxed: stop and evaluate on held-out prompts; " if maxed else
           "Evaluate on held-out prompts; ")
        + f"{stopper}; move to harder prompts; or turn on dynamic_sampling=True to resample until a step has "
        "informative groups.", span, {"saturated_frac": share, "saturated_streak": float(streak)})]


def check_format_not_answer(view: RunView) -> list[Finding]:
    fmt, ans = view.of_kind("format"), view.of_kind("correctness")
    if not _can_run(view, "format_not_answer") or not fmt or not ans:
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
                f"{_steps_text(view.span(first))} -> {_steps_text(view.span(last))}: {f} {_num_text(f0)} -> "
                f"{_num_text(f1)}, {a} {_num_text(a0)} -> {_num_text(a1)} (window medians).",
                "The model learned the cheap reward (the output format) but not the task. Check that the answer "
                "reward can be earned at all (inspect the best completions and the gold answers; an extraction bug "
                "looks exactly like this), lower the format weight once the format is learned, make correctness "
                "the main reward (e.g. only pay format when the answer parses), use easier prompts or a stronger "
                "model, and raise G or temperature so correct answers appear in groups.",
                (view.span(first)[0], view.span(last)[1]),
                {f"{f}_first": f0, f"{f}_last": f1, f"{a}_first": a0, f"{a}_last": a1}))
    return out


def check_kl(view: RunView) -> list[Finding]:
    if not _can_run(view, "kl_growth"):
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
        f"KL per token: {_num_text(kl_mid)} at mid-run ({_steps_text(view.span(mid))}) -> {_num_text(kl_last)} in "
        f"{_steps_text(view.span(last))}; late slope {_num_text(slope)}/step"
        + (f"; beta={beta}." if beta is not None else "."),
        "The policy keeps moving away from the reference. Lower the learning rate, "
        + ("set beta > 0 (0.01-0.04) so something pulls it back" if beta == 0 else
           "raise beta (e.g. 0.04 -> 0.1) to pull it back")
        + ", keep max_grad_norm at 1.0, and look for reward hacking: colour the completions by KL "
        "in the completion inspector and read the tokens that drifted (repetition, odd formatting that games the "
        "reward).",
        view.span(last), {"kl_mid": kl_mid, "kl_last": kl_last, "kl_slope": slope})]


def check_length(view: RunView) -> list[Finding]:
    if not _can_run(view, "length"):
        return []
    out = []
    if view.has("completion/truncated_frac"):
        t0, t1, first, last = _first_last(view, "completion/truncated_frac")
        if t1 >= TRUNC_WARN:
            rising = view.n >= MIN_TREND_STEPS and t1 - t0 >= TRUNC_RISE
            improving = view.n >= MIN_TREND_STEPS and t0 - t1 >= 2 * TRUNC_RISE
            severity = "info" if improving else "problem" if t1 >= TRUNC_PROBLEM else "warning"
            out.append(Finding(
                "length", severity, "Truncated completions are " + ("rising" if rising else
                                                                    "falling but still frequent" if improving else
                                                                    "frequent"),
                f"truncated share {t0:.0%} in {_steps_text(view.span(first))} -> {t1:.0%} in "
                f"{_steps_text(view.span(last))}" + _limit_text(view) + ".",
                _LENGTH_ADVICE, view.span(last), {"truncated_first": t0, "truncated_last": t1}))
    limit = view.config.get("max_completion_length")
    if limit and view.n >= MIN_TREND_STEPS and view.has("completion/mean_length") and not out:
        l0, l1, first, last = _first_last(view, "completion/mean_length")
        if l1 >= LENGTH_NEAR_LIMIT * limit and l1 >= LENGTH_DRIFT * l0:
            out.append(Finding(
                "length", "warning", "Completion length is drifting to the limit",
                f"mean length {_num_text(l0)} -> {_num_text(l1)} tokens ({_steps_text(view.span(first))} -> "
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
    return f"; mean length {_num_text(length)} of max_completion_length={limit}" if limit else ""


def check_entropy(view: RunView) -> list[Finding]:
    if not _can_run(view, "entropy_collapse"):
        return []
    e0, e1, first, last = _first_last(view, "entropy/mean")
    collapsed = e0 > 0 and e1 <= ENTROPY_COLLAPSE * e0
    if not (collapsed or e1 < ENTROPY_FLOOR):
        return []
    low, high = view.total_range
    reward = _median(view.col("reward/mean")[last])
    span, figures = (view.span(first)[0], view.span(last)[1]), {"entropy_first": e0, "entropy_last": e1}
    text = (f"mean token entropy {_num_text(e0)} in {_steps_text(view.span(first))} -> {_num_text(e1)} nats in "
            f"{_steps_text(view.span(last))}")
    if reward >= high - CONVERGED_SHARE * (high - low):  # the reward is maxed: determinism is convergence
        return [Finding(
            "entropy_collapse", "info", "Entropy fell as the policy converged on the maximal reward",
            f"{text}, while the mean reward was {_num_text(reward)} of at most {_num_text(high)}.",
            "Expected once the task is solved: the policy answers the same way every time. Nothing more is "
            "learned from these prompts (see saturation); harder prompts, or stop.", span, figures)]
    return [Finding(
        "entropy_collapse", "problem" if e1 < ENTROPY_FLOOR else "warning", "Entropy collapse",
        f"{text}, while the mean reward was {_num_text(reward)} of at most {_num_text(high)}.",
        "The policy has become (nearly) deterministic below the maximal reward: the G completions of a group "
        "become identical, their rewards equal, and the learning signal disappears. Lower the learning rate, "
        "raise temperature, use clip-higher (epsilon_high=0.28, DAPO) at num_iterations > 1, or raise beta.",
        span, figures)]


def check_clipping(view: RunView) -> list[Finding]:
    if not _can_run(view, "clipping") or _num_iterations(view) <= 1:
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
    if not _can_run(view, "reward_dominance") or len(view.reward_names) < 2:
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
    if not _can_run(view, "unscorable"):
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


def check_grad_norm(view: RunView) -> list[Finding]:
    if not _can_run(view, "grad_spikes"):
        return []
    g = view.col("grad_norm")
    med = _median(g)
    out = []
    if med > 0:
        spikes = view.steps[np.nan_to_num(g, nan=0.0) > GRAD_SPIKE * med]
        if len(spikes):
            out.append(Finding(
                "grad_spikes", "warning", "Gradient-norm spikes",
                f"grad_norm above {GRAD_SPIKE:g}x the run's median ({_num_text(med)}) at step(s) "
                f"{_step_list(spikes)}; largest {_num_text(float(np.nanmax(g)))}.",
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
                f"grad_norm > max_grad_norm={max_norm} on {clipped:.0%} of steps (median {_num_text(med)}).",
                "Each update is rescaled to norm max_grad_norm, so the learning rate is effectively lower than set. "
                "Fine for stability; if learning is slow, the learning rate (not clipping) is the knob.",
                view.span(slice(None)), {"clipped_frac": clipped, "grad_norm_median": med}))
    return out


def check_reward_trend(view: RunView) -> list[Finding]:
    if not _can_run(view, "reward_trend") or breakdown(view):  # a wrecked run is check_destroyed's finding
        return []
    r0, r1, first, last = _first_last(view, "reward/mean")
    lo, hi = view.total_range
    change = (r1 - r0) / (hi - lo)
    span = (view.span(first)[0], view.span(last)[1])
    text = (f"mean reward {_num_text(r0)} in {_steps_text(view.span(first))} -> {_num_text(r1)} in "
            f"{_steps_text(view.span(last))}")
    if change <= -REWARD_DROP:
        return [Finding(
            "reward_decline", "warning", "Reward fell during training",
            text + f" (range {_num_text(lo)}..{_num_text(hi)}).",
            "The policy got worse on its own reward: usually a learning rate too high (watch KL and grad_norm), "
            "or a collapse after reward hacking. Lower the learning rate, raise beta, and resume from an earlier "
            "checkpoint.", span, {"reward_first": r0, "reward_last": r1})]
    quiet = _median(view.col("groups/no_signal_frac")[last]) < NO_SIGNAL_WARN
    unsaturated = _median(view.col("groups/saturated_frac")[last]) <= MOST
    if abs(change) < REWARD_FLAT and quiet and unsaturated and (r1 - lo) / (hi - lo) < 1 - EDGE_TOL:
        return [Finding(
            "reward_flat", "info", "Reward is not moving", text + " although groups do have reward variance.",
            "There is signal but no progress yet: give it more steps, or raise the learning rate (LoRA: 1e-5..1e-4 "
            "and up to 2e-4 for small models), and check adv/abs_mean and grad_norm are not ~0.",
            span, {"reward_first": r0, "reward_last": r1})]
    return []


def check_loss_zero(view: RunView) -> list[Finding]:
    if not _can_run(view, "loss_zero") or not view.has("loss") or _num_iterations(view) != 1:
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
    grad_note = (f" Here even the gradient is ~0 (median grad_norm {_num_text(grad)}): no group has reward variance "
                 "and the policy is still at its reference, so nothing moves; see the zero-variance finding."
                 if grad < GRAD_ZERO else "")
    loss_type = view.config.get("loss_type", "grpo")
    token_note = (f" With loss_type='{loss_type}' the policy term is a token mean, so long completions weigh more "
                  "and it is small but not exactly 0.") if loss_type in ("bnpo", "dapo") else ""
    return [Finding(
        "loss_zero", "info", title,
        f"median |loss| {_num_text(med)} over {view.n} steps; median beta*KL {_num_text(_median(beta_kl))}; median "
        f"|loss - beta*KL| {_num_text(policy_term)}.",
        "Not a bug. With one update per generation batch the ratio to the old policy is exactly 1 and each group's "
        "advantages have zero mean, so the policy-gradient term's value is ~0 by construction; its gradient is "
        "not 0. What is left is beta * KL." + token_note + " Judge learning by reward/mean, adv/abs_mean and "
        "grad_norm, not by the loss." + grad_note,
        view.span(slice(None)), {"loss_abs_median": med, "beta_kl_median": _median(beta_kl),
                                 "policy_term_median": policy_term})]


CHECKS = (check_nonfinite, check_fp16_overflow, check_destroyed, check_no_signal, check_collapse, check_saturation,
          check_format_not_answer, check_kl, check_length, check_entropy, check_clipping, check_reward_dominance,
          check_unscorable, check_grad_norm, check_reward_trend, check_loss_zero)


def diagnose(run, config=None) -> list[Finding]:
    """Findings for a run (a run directory, a log.jsonl, a TRL output dir, StepRecords or a RunView), most
    severe first. `config` (dict or GRPOConfig) is read from the run directory's config.json when not given."""
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


def format_findings(findings: list[Finding], width: int = 100, not_run: dict[str, str] | None = None) -> str:
    """Findings as terminal text: a summary line, then one block per finding (severity, title, evidence, advice);
    with `not_run` (checks_not_run), a last line on the checks that could not run and why."""
    counts = [f"{n} {s}" for s in reversed(SEVERITIES) if (n := sum(f.severity == s for f in findings))]
    blocks = ["run doctor: " + (f"{len(findings)} finding(s): {', '.join(counts)}" if findings else
                                "no findings: nothing looks wrong")]
    for f in findings:
        blocks.append(f"[{LABELS[f.severity]}] {f.title}\n{_wrapped('evidence', f.evidence, width)}\n"
                      f"{_wrapped('advice', f.advice, width)}")
    if not_run:
        by_reason = {why: [c for c in not_run if not_run[c] == why] for why in not_run.values()}
        blocks.append(textwrap.fill("could not run: " + "; ".join(f"{', '.join(c)} ({why})"
                                                                  for why, c in by_reason.items()),
                                    width, subsequent_indent="    "))
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
