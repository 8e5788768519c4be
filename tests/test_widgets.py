"""Widgets driven headless as a user would (pick, slide, toggle, type), checked against hand-computed values."""

import math
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from grpo_lib.runlog import StepRecord  # noqa: E402
from grpo_lib.widgets import (  # noqa: E402
    CompletionInspector, RewardPlayground, TrainingDashboard, format_step_line, in_notebook, select_completions,
)

EPS = 1e-4


def test_core_never_imports_widgets():
    code = ("import sys, grpo_lib.plots, grpo_lib.runlog, grpo_lib.rewards, grpo_lib.advantages; "
            "assert 'ipywidgets' not in sys.modules and 'grpo_lib.widgets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# completion inspector
# ----------------------------------------------------------------------------------------------


def inspector_record(step: int, with_tokens: bool) -> StepRecord:
    """2 groups of G=3; every completion is the two tokens 'x' and '<y>'."""
    tokens = [["x", "<y>"] for _ in range(6)]
    stats = {"logp": [[-0.1, -2.0]] * 6, "ratio": [[1.1, 0.9]] * 6, "kl": [[0.0, 0.05]] * 6}
    return StepRecord(
        step=step, prompts=["first prompt", "second prompt"], completions=["x<y>"] * 6,
        reward_names=["fmt", "ans"], rewards=[[1, None], [1, 1], [1, 1], [0, None], [0.5, 0], [0, 0]],
        reward_weights=[1.0, 1.0], total=[1, 2, 2, 0, 0.5, 0], advantages=[-1.15, 0.58, 0.58, -0.58, 1.15, -0.58],
        truncated=[False, False, True, True, False, False], lengths=[2] * 6, num_generations=3,
        answers=["1", "2"], tokens=tokens if with_tokens else [], token_stats=stats if with_tokens else {})


def cards(inspector):
    return inspector.html.value.count('class="grpo-card"')


def test_inspector_pick_step_prompt_and_filter():
    insp = CompletionInspector([inspector_record(1, False), inspector_record(2, True)])
    assert insp.step.value == 2 and insp.shown == [0, 1, 2] and cards(insp) == 3
    insp.filter.value = "best"
    assert insp.shown == [1, 2]  # both completions tied at the highest total 2
    insp.prompt.value = 1
    assert insp.shown == [4]
    insp.filter.value = "worst"
    assert insp.shown == [3, 5] and cards(insp) == 2
    insp.filter.value = "truncated"
    assert insp.shown == [3] and "truncated" in insp.html.value
    insp.step.value = 1  # a new step starts at its first prompt, keeping the filter
    assert insp.prompt.value == 0 and insp.shown == [2]


def test_inspector_card_shows_breakdown_total_and_advantage():
    insp = CompletionInspector(inspector_record(2, True))
    insp.prompt.value = 1
    insp.filter.value = "best"
    html = insp.html.value
    assert 'data-index="4"' in html and "total <b>0.5</b>" in html and "+1.150" in html
    assert "<td>fmt</td><td>&times;1</td><td>0.5</td>" in html and "<td>ans</td><td>&times;1</td><td>0</td>" in html
    insp.filter.value = "worst"
    assert "<td>ans</td><td>&times;1</td><td>n/a</td>" in insp.html.value  # None = does not apply
    assert "x&lt;y&gt;" in insp.html.value and "<y>" not in insp.html.value  # completion text is escaped


@pytest.mark.parametrize("quantity, first, second", [
    ("logp", 'logp=-0.1" style="background:rgba(214,39,40,0.10)', 'logp=-2" style="background:rgba(214,39,40,0.86)'),
    ("ratio", 'ratio=1.1" style="background:rgba(31,119,180,0.50)',
     'ratio=0.9" style="background:rgba(255,127,14,0.50)'),
    ("kl", 'kl=0" style="background:rgba(148,103,189,0.00)', 'kl=0.05" style="background:rgba(148,103,189,1.00)'),
])
def test_inspector_colours_tokens(quantity, first, second):
    # logp: opacity 1 - p: 1 - e^-0.1 = 0.095, 1 - e^-2 = 0.865; ratio: |r - 1| / 0.2 = 0.5, blue above 1,
    # orange below; kl: relative to the largest KL on screen (0.05)
    insp = CompletionInspector([inspector_record(1, False), inspector_record(2, True)])
    insp.colour_by.value = quantity
    html = insp.html.value
    assert html.count(first) == 3 and html.count(second) == 3
    assert ">&lt;y&gt;</span>" in html
    insp.step.value = 1
    assert f"no per-token {quantity} stored" in insp.html.value and "<span title" not in insp.html.value


def test_select_completions_rejects_unknown_filter():
    with pytest.raises(ValueError, match="choose one of"):
        select_completions(inspector_record(1, False), 0, "median")


# ----------------------------------------------------------------------------------------------
# reward playground: G = 4, two groups; yes = 4 if the completion starts with "yes", bang = 4 if it
# ends with "!" and None (does not apply) otherwise
# ----------------------------------------------------------------------------------------------


def yes(prompts, completions, **columns):
    return [4.0 if c.startswith("yes") else 0.0 for c in completions]


def bang(prompts, completions, **columns):
    return [4.0 if c.endswith("!") else None for c in completions]


def playground_record() -> StepRecord:
    completions = ["yes", "no", "no", "no", "yes", "yes", "yes", "yes!"]
    return StepRecord(step=7, prompts=["q0", "q1"], completions=completions, reward_names=[], rewards=[[]] * 8,
                      reward_weights=[], total=[0.0] * 8, advantages=[0.0] * 8, truncated=[False] * 8,
                      lengths=[1] * 8, num_generations=4)


def assert_state(pg, totals, advantages, zero_count):
    torch.testing.assert_close(pg.totals, torch.tensor(totals, dtype=torch.float32))
    torch.testing.assert_close(pg.advantages, torch.tensor(advantages, dtype=torch.float32))
    assert pg.zero_std_count == zero_count
    assert f"zero-variance groups: <b>{zero_count} / 2</b>" in pg.status.value


def by(values, divisor):
    return [v / divisor for v in values]


def test_playground_initial_scores():
    pg = RewardPlayground([playground_record()], [yes, bang])
    # totals: group 0 [4,0,0,0] (bang does not apply: not a zero, just absent), group 1 [4,4,4,4+4]
    # group 0: mean 1, deviations [3,-1,-1,-1], unbiased std sqrt(12/3) = 2
    # group 1: mean 5, deviations [-1,-1,-1,3], std 2
    assert_state(pg, [4, 0, 0, 0, 4, 4, 4, 8], [by([3, -1, -1, -1], 2 + EPS), by([-1, -1, -1, 3], 2 + EPS)], 0)
    assert pg.scores.names == ["yes", "bang"] and pg.error is None
    assert pg.rescored_record().total == [4, 0, 0, 0, 4, 4, 4, 8]


def test_playground_weight_slider():
    pg = RewardPlayground([playground_record()], [yes, bang])
    png = bytes(pg.image.value)
    pg.sliders["yes"].value = 0.0
    # group 0 all 0 -> zero variance; group 1 [0,0,0,4]: mean 1, deviations [-1,-1,-1,3], std 2
    assert_state(pg, [0, 0, 0, 0, 0, 0, 0, 4], [[0, 0, 0, 0], by([-1, -1, -1, 3], 2 + EPS)], 1)
    assert bytes(pg.image.value) != png and bytes(pg.image.value).startswith(b"\x89PNG")
    pg.sliders["yes"].value = 1.0
    pg.sliders["bang"].value = 0.5
    # group 1 [4,4,4,6]: mean 4.5, deviations [-.5,-.5,-.5,1.5], sum of squares 3, std sqrt(3/3) = 1
    assert_state(pg, [4, 0, 0, 0, 4, 4, 4, 6], [by([3, -1, -1, -1], 2 + EPS), by([-0.5, -0.5, -0.5, 1.5], 1 + EPS)], 0)


def test_playground_toggle_off():
    pg = RewardPlayground([playground_record()], [yes, bang])
    pg.toggles["bang"].value = False
    # group 1 becomes [4,4,4,4]: zero variance
    assert_state(pg, [4, 0, 0, 0, 4, 4, 4, 4], [by([3, -1, -1, -1], 2 + EPS), [0, 0, 0, 0]], 1)
    pg.toggles["yes"].value = False
    assert_state(pg, [0] * 8, [[0] * 4, [0] * 4], 2)  # nothing switched on: every total is 0


def test_playground_regex_text_box():
    pg = RewardPlayground([playground_record()], [yes, bang])
    pg.regex.value = "no"  # regex_reward: 1 where the whole (stripped) completion matches
    # group 0 [4,1,1,1]: mean 1.75, deviations [2.25,-.75,-.75,-.75], sum of squares 6.75, std sqrt(2.25) = 1.5
    assert_state(pg, [4, 1, 1, 1, 4, 4, 4, 8],
                 [by([2.25, -0.75, -0.75, -0.75], 1.5 + EPS), by([-1, -1, -1, 3], 2 + EPS)], 0)
    assert pg.scores.names == ["yes", "bang", "regex"]
    pg.sliders["regex"].value = 2.0
    # group 0 [4,2,2,2]: mean 2.5, deviations [1.5,-.5,-.5,-.5], sum of squares 3, std 1
    assert_state(pg, [4, 2, 2, 2, 4, 4, 4, 8], [by([1.5, -0.5, -0.5, -0.5], 1 + EPS), by([-1, -1, -1, 3], 2 + EPS)], 0)
    pg.regex.value = "("  # not a regex: reported, the last good state stays
    assert "not applied" in pg.status.value and "missing )" in pg.error
    torch.testing.assert_close(pg.totals, torch.tensor([4.0, 2, 2, 2, 4, 4, 4, 8]))
    pg.regex.value = ""  # empty: the regex reward is skipped
    assert pg.error is None and "regex empty" in pg.status.value
    torch.testing.assert_close(pg.totals, torch.tensor([4.0, 0, 0, 0, 4, 4, 4, 8]))


def test_playground_scale_variants():
    pg = RewardPlayground([playground_record()], [yes, bang])
    pg.scale.value = "none"  # Dr. GRPO: centred rewards, not divided
    assert_state(pg, [4, 0, 0, 0, 4, 4, 4, 8], [[3, -1, -1, -1], [-1, -1, -1, 3]], 0)
    pg.scale.value = "batch"
    # all 8 totals: mean 3, deviations [1,-3,-3,-3,1,1,1,5], sum of squares 56, std sqrt(56/7) = 2*sqrt(2)
    s = 2 * math.sqrt(2) + EPS
    assert_state(pg, [4, 0, 0, 0, 4, 4, 4, 8], [by([3, -1, -1, -1], s), by([-1, -1, -1, 3], s)], 0)


def test_playground_given_weights():
    pg = RewardPlayground([playground_record()], [yes, bang], weights=[0.5, -1.0])
    # group 0 [2,0,0,0]: mean .5, deviations [1.5,-.5,-.5,-.5], sum of squares 3, std 1
    # group 1 [2,2,2,2-4]: mean 1, deviations [1,1,1,-3], sum of squares 12, std 2
    assert_state(pg, [2, 0, 0, 0, 2, 2, 2, -2], [by([1.5, -0.5, -0.5, -0.5], 1 + EPS), by([1, 1, 1, -3], 2 + EPS)], 0)
    assert pg.sliders["bang"].value == -1.0
    with pytest.raises(ValueError, match="one weight per function"):
        RewardPlayground([playground_record()], [yes, bang], weights=[1.0])


def test_playground_uses_answers_and_picks_step():
    rec = playground_record()
    rec.completions = ["<answer>4</answer>", "<answer>5</answer>", "4", "x"] + ["<answer>1</answer>"] * 4
    rec.answers = ["4", "1"]
    other = StepRecord(**{**rec.__dict__, "step": 8, "answers": ["5", "1"]})
    pg = RewardPlayground([rec, other], ["answer"])
    assert pg.step.value == 8  # the last step by default
    assert_state(pg, [0, 1, 0, 0, 1, 1, 1, 1], [by([-0.25, 0.75, -0.25, -0.25], 0.5 + EPS), [0] * 4], 1)
    pg.step.value = 7  # the gold answer of group 0 is now 4
    # [1,0,0,0]: mean .25, deviations [.75,-.25,-.25,-.25], sum of squares .75, std sqrt(.25) = .5
    assert_state(pg, [1, 0, 0, 0, 1, 1, 1, 1], [by([0.75, -0.25, -0.25, -0.25], 0.5 + EPS), [0] * 4], 1)


# ----------------------------------------------------------------------------------------------
# dashboard
# ----------------------------------------------------------------------------------------------


def dashboard_record(step: int) -> StepRecord:
    rec = playground_record()
    rec.step, rec.metrics = step, {"reward/mean": step / 4, "kl/mean": 0.01 * step, "lr": 1e-5}
    return rec


def test_in_notebook_is_false_under_pytest():
    assert in_notebook() is False


def test_dashboard_terminal(capsys):
    dash = TrainingDashboard(3, notebook=False)
    for step in (1, 2, 3):
        dash.update(dashboard_record(step))
    dash.close()
    assert dash.bar.n == 3
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step")]
    assert lines == ["step 1/3  reward 0.25  kl 0.01", "step 2/3  reward 0.5  kl 0.02",
                     "step 3/3  reward 0.75  kl 0.03"]


def test_dashboard_notebook_widgets():
    dash = TrainingDashboard(4, plot_every=2, notebook=True)
    dash.update(dashboard_record(1))
    assert dash.progress.value == 1 and bytes(dash.image.value) == b""  # curves drawn every 2 steps
    assert "step 1/4  reward 0.25" in dash.line.value
    dash.update(dashboard_record(2))
    first = bytes(dash.image.value)
    assert dash.progress.value == 2 and first.startswith(b"\x89PNG")
    dash.update(dashboard_record(3))
    dash.update(dashboard_record(4))
    assert dash.progress.value == 4 and bytes(dash.image.value) != first and len(dash.records) == 4


def test_format_step_line_skips_missing_metrics():
    assert format_step_line(dashboard_record(2), 10) == "step 2/10  reward 0.5  kl 0.02"
