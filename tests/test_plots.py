"""The figures show what the records hold: bar heights, colours, labels, markers and curve data."""

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from grpo_lib.plots import (  # noqa: E402
    AFTER_COLOR, BEFORE_COLOR, CURVE_PANELS, NEGATIVE_COLOR, POSITIVE_COLOR, RUN_PANELS, ZERO_COLOR, ema,
    plot_eval_comparison, plot_group_advantages, plot_runs, plot_training_curves,
)
from grpo_lib.runlog import StepRecord, append_record  # noqa: E402

EPS = 1e-4
G = 4
# group 0: [4,0,0,0] mean 1, deviations [3,-1,-1,-1], unbiased std sqrt(12/3) = 2
# group 1: all equal -> zero variance, advantages exactly 0
# group 2: [0,1,2,1] mean 1, deviations [-1,0,1,0], unbiased std sqrt(2/3); the middle ones get exactly 0
TOTALS = [4.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 1.0]
ADVANTAGES = ([d / (2 + EPS) for d in (3, -1, -1, -1)] + [0.0] * 4
              + [d / (math.sqrt(2 / 3) + EPS) for d in (-1, 0, 1, 0)])
TRUNCATED = [False, True, False, False] + [False] * 4 + [False, False, False, True]


def step_record(step=1, metrics=None) -> StepRecord:
    return StepRecord(
        step=step, prompts=["p0", "p1", "p2"], completions=[f"c{i}" for i in range(12)], reward_names=["r"],
        rewards=[[t] for t in TOTALS], reward_weights=[1.0], total=list(TOTALS), advantages=list(ADVANTAGES),
        truncated=list(TRUNCATED), lengths=[5] * 12, num_generations=G, metrics=metrics or {},
        columns={"answer": ["7", None, "3"]})


def zero_variance_marks(ax):
    return [t for t in ax.texts if t.get_gid() == "zero-variance"]


def sign_colour(a):
    return to_rgba(POSITIVE_COLOR if a > 0 else NEGATIVE_COLOR if a < 0 else ZERO_COLOR)


def test_group_advantages_bars_colours_labels_and_markers():
    record = step_record()
    before = record.to_dict()
    fig = plot_group_advantages(record)
    assert len(fig.axes) == 3
    for g, ax in enumerate(fig.axes):
        bars = ax.patches
        sl = slice(g * G, (g + 1) * G)
        assert len(bars) == G
        assert [b.get_height() for b in bars] == pytest.approx(ADVANTAGES[sl])
        assert [b.get_facecolor() for b in bars] == [sign_colour(a) for a in ADVANTAGES[sl]]
        assert [float(t.get_text()) for t in ax.texts if t.get_gid() != "zero-variance"] == TOTALS[sl]
        assert [bool(b.get_hatch()) for b in bars] == TRUNCATED[sl]
        assert len(zero_variance_marks(ax)) == (1 if g == 1 else 0)
    assert [ax.get_title() for ax in fig.axes] == ["group 0 (gold 7)", "group 1", "group 2 (gold 3)"]
    assert "1/3 groups with zero variance" in fig._suptitle.get_text()
    assert record.to_dict() == before  # never mutates


def test_group_advantages_unscorable_completions():
    record = step_record()
    record.total[1] = None  # no reward function applied: advantage 0 (its group's mean and std skip it)
    record.advantages[:4] = [1.15, 0.0, -0.58, -0.58]
    record.total[4:8] = [float("nan")] * 4  # a whole group unscorable (NaN, as a tensor's tolist() gives it)
    record.advantages[4:8] = [None] * 4  # NaN advantages after a JSON round trip
    fig = plot_group_advantages(record)
    labels = [[t.get_text() for t in ax.texts if t.get_gid() != "zero-variance"] for ax in fig.axes[:2]]
    assert labels == [["4", "n/a", "0", "0"], ["n/a"] * 4]
    assert [b.get_height() for b in fig.axes[1].patches] == [0.0] * 4
    assert fig.axes[0].patches[1].get_facecolor() == to_rgba(ZERO_COLOR)
    assert len(zero_variance_marks(fig.axes[1])) == 1  # no scorable completion: no gradient
    assert "n/a = unscorable" in fig._suptitle.get_text()


def test_group_advantages_max_groups():
    fig = plot_group_advantages(step_record(), max_groups=2)
    assert len(fig.axes) == 2
    assert sum(len(ax.patches) for ax in fig.axes) == 2 * G


def test_ema_by_hand():
    # m0 = 0.5, s0 = 0.5 / 0.5 = 1; m1 = 0.25 + 1.5 = 1.75, s1 = 1.75 / 0.75; m2 = 0.875 + 1 = 1.875, s2 = 1.875 / 0.875
    assert ema([1.0, 3.0, 2.0], smoothing=0.5) == pytest.approx([1.0, 1.75 / 0.75, 1.875 / 0.875])
    assert ema([5.0, 1.0], smoothing=0.0) == [5.0, 1.0]
    assert ema([], smoothing=0.6) == []
    assert ema([2.0] * 5, smoothing=0.9) == pytest.approx([2.0] * 5)  # debiased: a constant stays itself


CURVE_METRICS = [
    {"reward/mean": 1.0, "reward/format/mean": 0.0, "kl/mean": 0.1, "lr": 1e-5},
    {"reward/mean": 3.0, "reward/format/mean": 1.0, "lr": 1e-5},  # no KL logged this step
    {"reward/mean": 2.0, "reward/format/mean": 1.0, "kl/mean": 0.3, "lr": 1e-5},
]


def line(ax, gid):
    (found,) = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    return list(found.get_xdata()), list(found.get_ydata())


def panels(fig):
    return {ax.get_title(): ax for ax in fig.axes}


def note(fig):
    return [t.get_text() for t in fig.texts if t.get_gid() == "omitted-note"]


def check_curves(fig):
    axes = panels(fig)
    # missing metrics: no panel; the constant learning rate: no panel, a note under the figure
    assert set(axes) == {"reward (mean total)", "reward per function (mean)", "KL to reference"}
    assert note(fig) == ["constant over the run, not plotted: learning rate = 1e-05"]
    total, per_func = axes["reward (mean total)"], axes["reward per function (mean)"]
    assert line(total, "reward/mean:raw") == ([1, 2, 3], [1.0, 3.0, 2.0])
    xs, ys = line(total, "reward/mean:ema")  # smoothing 0.5, by hand in test_ema_by_hand
    assert xs == [1, 2, 3] and ys == pytest.approx([1.0, 1.75 / 0.75, 1.875 / 0.875])
    assert line(per_func, "reward/format/mean:raw") == ([1, 2, 3], [0.0, 1.0, 1.0])
    xs, ys = line(per_func, "reward/format/mean:ema")  # m = 0, 0.5, 0.75 over 1 - 0.5^(t+1) = 0.5, 0.75, 0.875
    assert xs == [1, 2, 3] and ys == pytest.approx([0.0, 0.5 / 0.75, 0.75 / 0.875])
    assert total.get_legend() is None  # one series, named by the title
    assert [t.get_text() for t in per_func.get_legend().get_texts()] == ["format"]  # found by reward/*/mean
    kl_x, kl_y = line(axes["KL to reference"], "kl/mean:raw")
    assert kl_x == [1, 3] and kl_y == pytest.approx([0.1, 0.3])  # the missing step is left out, not 0
    assert line(axes["KL to reference"], "kl/mean:ema")[1] == pytest.approx([0.1, 0.175 / 0.75])  # m1 = 0.025 + 0.15
    assert [ax.get_ylabel() for ax in fig.axes] == ["weighted total", "unweighted reward", "KL per token (nats)"]


def curve_records():
    return [step_record(step=s, metrics=m) for s, m in zip((1, 2, 3), CURVE_METRICS)]


def test_training_curves_from_records():
    records = curve_records()
    before = [r.to_dict() for r in records]
    check_curves(plot_training_curves(records, smoothing=0.5))
    assert [r.to_dict() for r in records] == before


def test_training_curves_from_run_dir(tmp_path):
    for r in reversed(curve_records()):  # load_run_log orders by step
        append_record(tmp_path, r)
    check_curves(plot_training_curves(tmp_path, smoothing=0.5))
    check_curves(plot_training_curves(str(tmp_path / "log.jsonl"), smoothing=0.5))


ALL_KEYS = ["reward/mean", "reward/format/mean", "reward/answer/mean", "reward/std", "adv/zero_std_frac",
            "reward/unscorable_frac", "kl/mean", "clip/low", "clip/high", "clip/region", "completion/mean_length",
            "completion/truncated_frac", "lr", "loss", "grad_norm", "time/step_s", "entropy/mean", "clip/cispo"]


def test_training_curves_all_panels_and_empty():
    varying = [step_record(step=s, metrics={k: 0.5 * s for k in ALL_KEYS}) for s in (1, 2)]
    fig = plot_training_curves(varying)
    assert [ax.get_title() for ax in fig.axes] == [title for title, _, _ in CURVE_PANELS] and note(fig) == []
    assert all(ax.get_ylabel() for ax in fig.axes)  # every panel says what its y axis is
    assert len([ln for ln in panels(fig)["clip fractions"].get_lines() if ln.get_gid().endswith(":ema")]) == 4
    legend = panels(fig)["reward per function (mean)"].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["answer", "format"]  # not mixed with the total
    single = plot_training_curves([step_record(step=1, metrics={k: 0.0 for k in ALL_KEYS})])
    assert len(single.axes) == len(CURVE_PANELS) and note(single) == []  # one step: nothing is constant yet
    empty = plot_training_curves([])
    assert [t.get_text() for t in empty.axes[0].texts] == ["no metrics recorded yet"]


def test_training_curves_leave_out_constant_panels():
    # num_iterations=1: clip fractions 0 by construction; constant lr; no unscorable completion
    metrics = [{"reward/mean": r, "reward/answer/mean": r, "lr": 1e-5, "clip/low": 0.0, "clip/high": 0.0,
                "clip/region": 0.0, "reward/unscorable_frac": 0.0, "kl/mean": 0.0 if s == 1 else None}
               for s, r in ((1, 0.0), (2, 0.5), (3, 0.25))]
    fig = plot_training_curves([step_record(step=s, metrics=m) for s, m in zip((1, 2, 3), metrics)])
    assert [ax.get_title() for ax in fig.axes] == ["reward (mean total)", "reward per function (mean)",
                                                   "KL to reference"]
    (text,) = note(fig)
    assert text.replace("\n", " ") == ("constant over the run, not plotted: unscorable completions = 0; clip "
                                        "fractions = 0; learning rate = 1e-05")  # KL: one point, not constant
    metrics[2]["reward/unscorable_frac"] = 0.25  # some completions unscorable: shown
    fig = plot_training_curves([step_record(step=s, metrics=m) for s, m in zip((1, 2, 3), metrics)])
    assert "unscorable completions" in panels(fig) and "unscorable" not in note(fig)[0]
    flat = plot_training_curves([step_record(step=s, metrics={"lr": 1e-5, "clip/low": 0.0, "clip/high": 0.1})
                                 for s in (1, 2)])
    assert [t.get_text() for t in flat.axes[0].texts] == ["every metric is constant (see below)"]
    assert [t.replace("\n", " ") for t in note(flat)] == [
        "constant over the run, not plotted: clip fractions: clip/low = 0, clip/high = 0.1; learning rate = 1e-05"]


RUN_A = [  # two reward functions, no KL logged (beta = 0)
    {"reward/mean": 1.0, "reward/format/mean": 0.5, "reward/answer/mean": 0.5, "adv/zero_std_frac": 0.25,
     "completion/mean_length": 10.0, "entropy/mean": 1.0, "lr": 1e-5},
    {"reward/mean": 2.0, "reward/format/mean": 1.0, "reward/answer/mean": 1.0, "adv/zero_std_frac": 0.5,
     "completion/mean_length": 12.0, "entropy/mean": 0.5, "lr": 1e-5},
]
RUN_B = [  # another reward function, KL logged, one step missing its entropy
    {"reward/mean": 0.0, "reward/buggy/mean": 0.0, "adv/zero_std_frac": 1.0, "kl/mean": 0.0,
     "completion/mean_length": 16.0, "entropy/mean": 2.0},
    {"reward/mean": 0.0, "reward/buggy/mean": 0.0, "adv/zero_std_frac": 1.0, "kl/mean": 0.01,
     "completion/mean_length": 16.0},
    {"reward/mean": 0.0, "reward/buggy/mean": 0.0, "adv/zero_std_frac": 1.0, "kl/mean": 0.03,
     "completion/mean_length": 15.0, "entropy/mean": 1.0},
]


def run_records(metrics):
    return [step_record(step=s, metrics=m) for s, m in enumerate(metrics, start=1)]


def test_plot_runs_overlays_runs_with_one_colour_each(tmp_path):
    a = run_records(RUN_A)
    for r in run_records(RUN_B):
        append_record(tmp_path, r)
    before = [r.to_dict() for r in a]
    fig = plot_runs({"grpo": a, "dapo": tmp_path}, smoothing=0.5)  # records and a run directory
    assert [r.to_dict() for r in a] == before  # never mutates
    axes = panels(fig)
    assert list(axes) == [title for title, _, _ in RUN_PANELS] == [
        "reward (mean total)", "reward per function (mean)", "zero-variance groups", "KL to reference",
        "completion length", "token entropy"]  # lr and the other CURVE_PANELS are not overlaid
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["grpo", "dapo"]  # one entry per run
    total = axes["reward (mean total)"]
    assert line(total, "grpo:reward/mean:raw") == ([1, 2], [1.0, 2.0])
    xs, ys = line(total, "grpo:reward/mean:ema")  # m0 = 0.5, s0 = 1; m1 = 0.25 + 1 = 1.25, s1 = 1.25 / 0.75
    assert xs == [1, 2] and ys == pytest.approx([1.0, 1.25 / 0.75])
    assert line(total, "dapo:reward/mean:raw") == ([1, 2, 3], [0.0, 0.0, 0.0])
    colour = {gid.split(":")[0]: to_rgba(ln.get_color()) for ln in total.get_lines() if (gid := ln.get_gid())}
    assert colour == {"grpo": to_rgba("C0"), "dapo": to_rgba("C1")}
    assert {ln.get_label() for ln in total.get_lines() if ln.get_gid().endswith(":ema")} == {"grpo", "dapo"}
    # per function: colour = run, line style = function, the panel's legend names the functions
    per_func = axes["reward per function (mean)"]
    emas = {ln.get_gid(): ln for ln in per_func.get_lines() if ln.get_gid().endswith(":ema")}
    assert set(emas) == {"grpo:reward/answer/mean:ema", "grpo:reward/format/mean:ema", "dapo:reward/buggy/mean:ema"}
    # raw [0.5, 1.0]: m0 = 0.25 -> 0.5; m1 = 0.125 + 0.5 = 0.625 -> 0.625 / 0.75
    assert list(emas["grpo:reward/format/mean:ema"].get_ydata()) == pytest.approx([0.5, 0.625 / 0.75])
    assert len({ln.get_linestyle() for ln in emas.values()}) == 3
    assert emas["grpo:reward/format/mean:ema"].get_color() == emas["grpo:reward/answer/mean:ema"].get_color()
    assert [t.get_text() for t in per_func.get_legend().get_texts()] == ["answer", "buggy", "format"]
    assert total.get_legend() is None  # one series per run: the figure's legend says which
    # a run that did not log a metric is absent from its panel; a missing step is left out, not 0
    kl = axes["KL to reference"]
    assert {ln.get_gid() for ln in kl.get_lines()} == {"dapo:kl/mean:raw", "dapo:kl/mean:ema"}
    assert line(kl, "dapo:kl/mean:raw")[1] == pytest.approx([0.0, 0.01, 0.03])
    assert line(axes["token entropy"], "dapo:entropy/mean:raw") == ([1, 3], [2.0, 1.0])
    assert line(axes["zero-variance groups"], "grpo:adv/zero_std_frac:raw") == ([1, 2], [0.25, 0.5])
    # raw 16, 16, 15: m2 = 0.5 * 12 + 7.5 = 13.5 over 0.875
    assert line(axes["completion length"], "dapo:completion/mean_length:ema")[1] == pytest.approx([16.0, 16.0,
                                                                                                 13.5 / 0.875])


def test_plot_runs_constant_runs_are_drawn_and_errors():
    # unlike plot_training_curves, a constant series is drawn: next to another run it is information
    flat = run_records([{"reward/mean": 1.0, "lr": 1e-5}] * 3)
    fig = plot_runs({"flat": flat}, smoothing=0.0)
    assert [ax.get_title() for ax in fig.axes] == ["reward (mean total)"]
    assert line(fig.axes[0], "flat:reward/mean:ema") == ([1, 2, 3], [1.0, 1.0, 1.0])
    empty = plot_runs({"nothing yet": []})
    assert [t.get_text() for t in empty.axes[0].texts] == ["no metrics recorded yet"]
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs({})


def test_eval_comparison_bars():
    before = {"format": 0.25, "accuracy": 0.125, "reward/mean": 0.5, "n": 8}
    after = {"format": 0.75, "accuracy": 0.5, "reward/mean": 1.5, "n": 8}
    ax = plot_eval_comparison(before, after).axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == [0.25, 0.125, 0.5, 0.75, 0.5, 1.5]
    assert [b.get_facecolor() for b in bars] == [to_rgba(BEFORE_COLOR)] * 3 + [to_rgba(AFTER_COLOR)] * 3
    assert [float(t.get_text()) for t in ax.texts] == [0.25, 0.125, 0.5, 0.75, 0.5, 1.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["format", "accuracy", "mean reward"]
    assert ax.get_title() == "evaluation on 8 prompts"


def test_eval_comparison_missing_metric_and_none():
    ax = plot_eval_comparison({"format": 0.25, "accuracy": 0.125}, {"format": 0.75}).axes[0]
    assert [b.get_height() for b in ax.patches] == [0.25, 0.125, 0.75]
    with pytest.raises(ValueError, match="evaluate"):
        plot_eval_comparison({"n": 3}, {})


def test_completion_lengths_bars_are_centred_on_the_lengths():
    """Lengths 3, 3, 5 and 5, 8 (budget 8): a bar of height 2 centred on 3, the budget line at 8 through the
    middle of the last bar, none to its right."""
    from grpo_lib.plots import plot_completion_lengths

    fig = plot_completion_lengths({"a": [3, 3, 5], "b": [5, 8]}, {"a": 8, "b": 4})
    ax = fig.axes[0]
    bars = {(round(p.get_x() + p.get_width() / 2, 6), p.get_facecolor()[:3]): p.get_height()
            for p in ax.patches if p.get_height() > 0}
    heights = sorted((x, h) for (x, _), h in bars.items())
    assert heights == [(3.0, 2), (5.0, 1), (5.0, 1), (8.0, 1)]
    assert all(p.get_width() == 1.0 for p in ax.patches)
    lines = {l.get_gid(): l.get_xdata()[0] for l in ax.lines}
    assert lines == {"budget a": 8, "budget b": 4}
    assert max(p.get_x() + p.get_width() for p in ax.patches if p.get_height() > 0) == 8.5  # the truncated bar: 7.5..8.5
