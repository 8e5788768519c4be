"""Matplotlib figures of step records and run logs: one function per figure, each returns the Figure.

The figures only read records (never mutate them). They are built with pyplot and then released
from it (`plt.close`), so a notebook shows a returned figure exactly once and a long run that
redraws every step does not accumulate open figures.
"""

from __future__ import annotations

import fnmatch
import math
import os
import textwrap

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator

from .advantages import group_advantages
from .runlog import StepRecord, load_run_log, metrics_table

POSITIVE_COLOR = "tab:green"  # advantage > 0: this completion is reinforced
NEGATIVE_COLOR = "tab:red"  # advantage < 0: this completion is discouraged
ZERO_COLOR = "tab:gray"  # advantage == 0: no gradient from this completion
BEFORE_COLOR, AFTER_COLOR = "tab:gray", "tab:blue"

# (panel title, y-axis label, metric keys or fnmatch patterns). A panel whose keys were never logged is
# skipped; one whose every series is constant over the run is left out and named, with its value, in a
# note under the figure (e.g. clip fractions, 0 by construction at num_iterations=1, or a constant lr).
CURVE_PANELS = (
    ("reward (mean total)", "weighted total", ("reward/mean",)),
    ("reward per function (mean)", "unweighted reward", ("reward/*/mean",)),
    ("reward std", "std of the total", ("reward/std",)),
    ("zero-variance groups", "fraction of groups", ("adv/zero_std_frac", "sampling/zero_std_frac")),
    ("unscorable completions", "fraction of completions", ("reward/unscorable_frac",)),
    ("KL to reference", "KL per token (nats)", ("kl/mean",)),
    ("completion length", "tokens (mean)", ("completion/mean_length",)),
    ("token entropy", "nats per token (mean)", ("entropy/mean",)),
    ("truncated completions", "fraction of completions", ("completion/truncated_frac",)),
    ("clip fractions", "fraction of tokens", ("clip/low", "clip/high", "clip/region", "clip/cispo")),
    ("learning rate", "learning rate", ("lr",)),
)

# (key in evaluate()'s dict, axis label)
EVAL_METRICS = (("format", "format"), ("accuracy", "accuracy"), ("reward/mean", "mean reward"))


def as_records(records_or_path) -> list[StepRecord]:
    """A StepRecord, a list of them, a run directory or a log.jsonl path -> a list of StepRecords."""
    if isinstance(records_or_path, StepRecord):
        return [records_or_path]
    if isinstance(records_or_path, (str, os.PathLike)):
        return load_run_log(records_or_path)
    return list(records_or_path)


def finite_or(x, default):
    """A stored number as a float, or `default` where it is missing: None (how the run log stores NaN, e.g. the
    total of an unscorable completion) or NaN."""
    return default if x is None or math.isnan(x) else float(x)


def ema(values: list[float], smoothing: float = 0.6) -> list[float]:
    """Debiased exponential moving average, as TensorBoard smooths:
    m_t = smoothing * m_{t-1} + (1 - smoothing) * x_t with m_{-1} = 0, and s_t = m_t / (1 - smoothing^(t+1)).
    Starting the average at x_0 instead (s_0 = x_0) gives the first step a weight that decays slowly, so a short
    run's smoothed curve stays near its first value and above or below every later raw point."""
    out: list[float] = []
    m = 0.0
    for t, x in enumerate(values):
        m = smoothing * m + (1 - smoothing) * x
        out.append(m / (1 - smoothing ** (t + 1)) if smoothing < 1 else x)
    return out


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kwargs):
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **kwargs)
    plt.close(fig)  # released from pyplot: see the module docstring
    return fig, axes.ravel()


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    ncols = max(1, min(n, max_cols))
    return math.ceil(n / ncols), ncols


# ----------------------------------------------------------------------------------------------
# completion lengths of rollouts
# ----------------------------------------------------------------------------------------------


def plot_completion_lengths(lengths: dict[str, list[int]], budgets: dict[str, int]):
    """Histogram of completion lengths (tokens, EOS included), one colour per rollout, one bar per length
    centred on it, so a completion that filled its budget (truncated) sits on that budget's dashed line.
    lengths: label -> [N] lengths; budgets: label -> max_completion_length."""
    fig, axes = _subplots(1, 1, (6, 2.6))
    ax = axes[0]
    longest = max([max(v) for v in lengths.values()] + list(budgets.values()))
    edges = [k - 0.5 for k in range(longest + 2)]  # bar k covers [k - 0.5, k + 0.5]
    for label, values in lengths.items():
        ax.hist(values, bins=edges, alpha=0.6, label=label)
    for label, budget in budgets.items():
        ax.axvline(budget, color="black", linestyle="--", linewidth=0.8, gid=f"budget {label}")
    ax.set_xlabel("completion tokens (EOS included); dashed: the budgets, truncated completions sit on them")
    ax.set_ylabel("completions")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# advantages of one step
# ----------------------------------------------------------------------------------------------


def _sign_color(a: float) -> str:
    return POSITIVE_COLOR if a > 0 else NEGATIVE_COLOR if a < 0 else ZERO_COLOR


def _draw_group(ax, record: StepRecord, g: int, zero_std: bool) -> None:
    """One group's G bars: height = advantage, colour = its sign, label = total reward ("n/a": unscorable,
    advantage 0), hatch = truncated."""
    sl = record.group_slice(g)
    advantages = [finite_or(a, 0.0) for a in record.advantages[sl]]
    totals = [finite_or(t, None) for t in record.total[sl]]
    bars = ax.bar(range(len(advantages)), advantages, color=[_sign_color(a) for a in advantages])
    for bar, cut in zip(bars, record.truncated[sl]):
        bar.set_hatch("//" if cut else None)
    ax.bar_label(bars, labels=["n/a" if t is None else f"{t:.3g}" for t in totals], padding=2, fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.margins(y=0.2)  # room for the labels
    ax.set_xticks(range(len(advantages)))
    gold = record.answers[g] if g < len(record.answers) and record.answers[g] is not None else None
    ax.set_title(f"group {g}" + (f" (gold {gold})" if gold is not None else ""), fontsize=9)
    if zero_std:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.95, "zero variance: no gradient", transform=ax.transAxes, ha="center", va="top",
                fontsize=8, color="dimgray", gid="zero-variance")


def plot_group_advantages(record: StepRecord, max_groups: int | None = None):
    """Per prompt of one step, its G completions as bars of their advantage, coloured by sign and
    labelled with their total reward ("n/a" where unscorable); zero-variance groups are greyed and marked,
    truncated bars hatched."""
    G = record.num_generations
    totals = torch.tensor([finite_or(t, math.nan) for t in record.total]).view(-1, G)  # [groups, G], NaN: unscorable
    _, zero_std = group_advantages(totals)  # [groups] bool; scale does not change which groups are flat
    n = record.num_groups if max_groups is None else min(max_groups, record.num_groups)
    nrows, ncols = _grid(n, max_cols=4)
    fig, axes = _subplots(nrows, ncols, (3.2 * ncols, 2.6 * nrows + 0.6), sharey=True)
    for g, ax in enumerate(axes):
        if g < n:
            _draw_group(ax, record, g, bool(zero_std[g]))
        else:
            ax.remove()
    for ax in axes[::ncols][:nrows]:
        ax.set_ylabel("advantage")
    # a shared y-axis of at least +-1 (advantages are z-scores): all-flat groups would otherwise zoom onto
    # rounding noise (an axis of 1e-17)
    shown = [abs(finite_or(a, 0.0)) for a in record.advantages[:n * G]]
    lim = max(1.0, 1.25 * max(shown, default=0.0))
    axes[0].set_ylim(-lim, lim)
    fig.suptitle(f"step {record.step}: advantage per completion (label = reward, n/a = unscorable, "
                 f"hatched = truncated); {int(zero_std.sum())}/{record.num_groups} groups with zero variance",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# training curves of a run
# ----------------------------------------------------------------------------------------------


def _series_label(key: str) -> str:
    """reward/mean -> total, reward/format/mean -> format, anything else unchanged."""
    if key == "reward/mean":
        return "total"
    parts = key.split("/")
    return parts[1] if parts[0] == "reward" and parts[-1] == "mean" and len(parts) == 3 else key


def _panel_keys(patterns: tuple[str, ...], table: dict[str, list[float]]) -> list[str]:
    keys: list[str] = []
    for pattern in patterns:
        keys += [k for k in sorted(fnmatch.filter(table, pattern)) if k not in keys and k != "step"]
    return [k for k in keys if any(math.isfinite(v) for v in table[k])]


def _constant_value(values: list[float]) -> float | None:
    """The value of a series that is the same at every step it was logged (at least two), else None."""
    finite = [v for v in values if math.isfinite(v)]
    return finite[0] if len(finite) >= 2 and min(finite) == max(finite) else None


def _constant_note(title: str, keys: list[str], table: dict[str, list[float]]) -> str | None:
    """'learning rate = 1e-05' when every series of the panel is constant over the run, else None."""
    values = [_constant_value(table[k]) for k in keys]
    if any(v is None for v in values):
        return None
    if len(set(values)) == 1:
        return f"{title} = {values[0]:.3g}"
    return f"{title}: " + ", ".join(f"{_series_label(k)} = {v:.3g}" for k, v in zip(keys, values))


def _draw_series(ax, steps: list[float], values: list[float], key: str, color, smoothing: float,
                 run: str | None = None, linestyle: str = "-") -> None:
    """Raw points faintly, their EMA as a line; missing (NaN) points are left out of both. With `run`
    (plot_runs) the line is labelled with the run and its gids are "run:key:raw" / "run:key:ema"."""
    xs, ys = zip(*[(s, v) for s, v in zip(steps, values) if math.isfinite(v)])
    gid = key if run is None else f"{run}:{key}"
    ax.plot(xs, ys, ".", color=color, alpha=0.35, markersize=4, gid=f"{gid}:raw")
    ax.plot(xs, ema(list(ys), smoothing), linestyle=linestyle, color=color, linewidth=1.5,
            label=_series_label(key) if run is None else run, gid=f"{gid}:ema")


def _draw_panel(ax, title: str, ylabel: str, keys: list[str], patterns, table, smoothing: float) -> None:
    for i, key in enumerate(keys):
        _draw_series(ax, table["step"], table[key], key, f"C{i}", smoothing)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(keys) > 1 or keys[0] not in patterns:  # several series, or one found by a pattern: name them
        ax.legend(fontsize=8)


def _add_note(fig, text: str, width_in: float) -> float:
    """Small grey text along the bottom of the figure; returns the fraction of the height it takes."""
    text = textwrap.fill(text, width=int(width_in * 15))
    fig.text(0.01, 0.01, text, fontsize=8, color="dimgray", va="bottom", gid="omitted-note")
    return (text.count("\n") + 1) * 0.17 / fig.get_figheight() + 0.02


def plot_training_curves(records_or_run_dir, smoothing: float = 0.6):
    """The run's metrics against step, one panel per quantity (see CURVE_PANELS): EMA-smoothed lines over
    the raw points, a y-axis label on each. Metrics that were never logged are skipped. A panel whose
    series are all constant over the run (two or more logged steps with one value, e.g. clip fractions at
    num_iterations=1 or a constant learning rate) is not drawn: a note under the figure names it and its value."""
    table = metrics_table(as_records(records_or_run_dir))
    found = [(title, ylabel, keys, patterns) for title, ylabel, patterns in CURVE_PANELS
             if (keys := _panel_keys(patterns, table))]
    notes = {title: note for title, _, keys, _ in found if (note := _constant_note(title, keys, table))}
    panels = [p for p in found if p[0] not in notes]
    nrows, ncols = _grid(len(panels) or 1, max_cols=3)
    fig, axes = _subplots(nrows, ncols, (4.2 * ncols, 2.8 * nrows + (0.4 if notes else 0.0)))
    if not panels:
        axes[0].text(0.5, 0.5, "every metric is constant (see below)" if notes else "no metrics recorded yet",
                     ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (title, ylabel, keys, patterns) in zip(axes, panels):
        _draw_panel(ax, title, ylabel, keys, patterns, table, smoothing)
    for ax in axes[max(len(panels), 1):]:
        ax.remove()
    bottom = _add_note(fig, "constant over the run, not plotted: " + "; ".join(notes.values()),
                       4.2 * ncols) if notes else 0.0
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


# ----------------------------------------------------------------------------------------------
# several runs on the same panels
# ----------------------------------------------------------------------------------------------

# The panels of plot_runs, taken from CURVE_PANELS: what tells runs apart (the entropy's fall is what an
# entropy collapse looks like).
RUN_PANEL_TITLES = ("reward (mean total)", "reward per function (mean)", "zero-variance groups", "KL to reference",
                    "completion length", "token entropy")
RUN_PANELS = tuple(p for p in CURVE_PANELS if p[0] in RUN_PANEL_TITLES)
LINESTYLES = ("-", "--", ":", "-.")  # one per reward function in the per-function panel


def plot_runs(runs: dict, smoothing: float = 0.6, panels=RUN_PANELS):
    """Several runs overlaid on the same panels (RUN_PANELS: reward, reward per function, zero-variance share,
    KL, completion length, token entropy), for comparing variants or settings.

    runs: {label: run directory, log.jsonl path or list of StepRecords}. One colour per run (the figure's legend),
    raw points faintly and their EMA as a line (as plot_training_curves); in a panel with several series per run
    (one per reward function) the line style tells them apart (the panel's legend). A panel is drawn when at
    least one run logged one of its metrics; a run that did not is absent from that panel."""
    if not runs:
        raise ValueError("plot_runs needs at least one run: {label: run_dir or records}")
    tables = {label: metrics_table(as_records(run)) for label, run in runs.items()}
    colors = {label: f"C{i}" for i, label in enumerate(tables)}
    found = []
    for title, ylabel, patterns in panels:
        keys = {label: _panel_keys(patterns, table) for label, table in tables.items()}
        if any(keys.values()):
            found.append((title, ylabel, keys))
    nrows, ncols = _grid(len(found) or 1, max_cols=3)
    fig, axes = _subplots(nrows, ncols, (4.2 * ncols, 2.8 * nrows + 0.5))
    if not found:
        axes[0].text(0.5, 0.5, "no metrics recorded yet", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (title, ylabel, keys) in zip(axes, found):
        names = sorted({k for ks in keys.values() for k in ks})
        styles = {k: LINESTYLES[i % len(LINESTYLES)] for i, k in enumerate(names)}
        for label, ks in keys.items():
            for key in ks:
                _draw_series(ax, tables[label]["step"], tables[label][key], key, colors[label], smoothing,
                             run=label, linestyle=styles[key])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also in short runs
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(names) > 1:  # several series per run: the line style names them
            ax.legend(handles=[plt.Line2D([], [], color="dimgray", linestyle=styles[k], label=_series_label(k))
                               for k in names], fontsize=8)
    for ax in axes[max(len(found), 1):]:
        ax.remove()
    fig.legend(handles=[plt.Line2D([], [], color=colors[label], linewidth=2, label=str(label)) for label in tables],
               loc="upper center", ncol=min(len(tables), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


# ----------------------------------------------------------------------------------------------
# evaluation before / after training
# ----------------------------------------------------------------------------------------------


def plot_eval_comparison(before: dict, after: dict, labels: tuple[str, str] = ("before", "after")):
    """Side-by-side bars of evaluate()'s format rate, accuracy and mean reward, before and after training."""
    shown = [(key, name) for key, name in EVAL_METRICS if before.get(key) is not None or after.get(key) is not None]
    if not shown:
        raise ValueError(f"neither result has any of the keys {[k for k, _ in EVAL_METRICS]}; "
                         f"pass the dicts returned by grpo_lib.eval.evaluate()")
    fig, axes = _subplots(1, 1, (1.8 * len(shown) + 2.5, 3.4))
    ax = axes[0]
    for offset, result, label, color in ((-0.2, before, labels[0], BEFORE_COLOR), (0.2, after, labels[1], AFTER_COLOR)):
        xs = [x + offset for x, (key, _) in enumerate(shown) if result.get(key) is not None]
        values = [float(result[key]) for key, _ in shown if result.get(key) is not None]
        bars = ax.bar(xs, values, width=0.4, color=color, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
    ax.set_xticks(range(len(shown)), [name for _, name in shown])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    n = after.get("n", before.get("n"))
    ax.set_title("evaluation" + (f" on {n} prompts" if n is not None else ""), fontsize=10)
    fig.tight_layout()
    return fig
