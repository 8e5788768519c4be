"""Widgets driven headless as a user would (pick, slide, toggle, type), checked against hand-computed values.

The file runs under the venv's ipywidgets 8 and, re-run in a subprocess by test_widgets_under_ipywidgets7,
under ipywidgets 7 (installed beside the venv by scripts/setup.sh, put first on PYTHONPATH).
"""

import base64
import dataclasses
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from grpo_lib import widgets  # noqa: E402
from grpo_lib.runlog import StepRecord  # noqa: E402
from grpo_lib.widgets import (  # noqa: E402
    WIDGET_VIEW_MIME, CompletionInspector, RewardPlayground, TrainingDashboard, eta_text, format_duration,
    format_step_line, in_notebook, select_completions,
)

EPS = 1e-4
ROOT = Path(__file__).resolve().parents[1]
IPYWIDGETS7_DIR = Path(os.environ.get("GRPO_IPYWIDGETS7_DIR", ROOT / ".venv" / "ipywidgets7"))
IPYWIDGETS7_INSTALL = (f"{sys.executable} -m pip install -q --no-deps --upgrade --target {IPYWIDGETS7_DIR} "
                       f"ipywidgets==7.8.5 ipython_genutils==0.2.0")
EXPECTED_MAJOR = "GRPO_EXPECT_IPYWIDGETS_MAJOR"  # set by the ipywidgets 7 re-run (and stops it recursing)


def test_core_never_imports_widgets():
    code = ("import sys, grpo_lib.plots, grpo_lib.runlog, grpo_lib.rewards, grpo_lib.advantages; "
            "assert 'ipywidgets' not in sys.modules and 'grpo_lib.widgets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# ipywidgets 7 and 8
# ----------------------------------------------------------------------------------------------


def test_ipywidgets_version():
    print(f"ipywidgets {ipywidgets.__version__} from {ipywidgets.__file__}")
    expected = os.environ.get(EXPECTED_MAJOR)
    assert ipywidgets.__version__.split(".")[0] == (expected or "8"), ipywidgets.__file__


@pytest.mark.skipif(bool(os.environ.get(EXPECTED_MAJOR)), reason="already the ipywidgets 7 re-run")
def test_widgets_under_ipywidgets7():
    """This whole file again, in a subprocess with ipywidgets 7 first on the path."""
    if not (IPYWIDGETS7_DIR / "ipywidgets").is_dir():
        pytest.fail(f"ipywidgets 7 is not installed at {IPYWIDGETS7_DIR}; run scripts/setup.sh, or: "
                    f"{IPYWIDGETS7_INSTALL}")
    path = [str(IPYWIDGETS7_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), EXPECTED_MAJOR: "7"}
    version = subprocess.run([sys.executable, "-c", "import ipywidgets as w; print(w.__version__, w.__file__)"],
                             env=env, capture_output=True, text=True, check=True).stdout
    print("ipywidgets", version)
    assert version.startswith(f"7.8.5 {IPYWIDGETS7_DIR}"), version
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", __file__],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = run.stdout[run.stdout.find("= FAILURES ="):][:8000] if "= FAILURES =" in run.stdout else run.stdout[-3000:]
    assert run.returncode == 0, f"under ipywidgets 7:\n{report}\n{run.stderr[-2000:]}"
    assert "::test_ipywidgets_version PASSED" in run.stdout  # it asserts ipywidgets 7 was the one imported
    print("under ipywidgets 7:", run.stdout.strip().splitlines()[-1])


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
        columns={"answer": ["1", "2"]}, tokens=tokens if with_tokens else [], token_stats=stats if with_tokens else {})


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


def test_inspector_card_shows_what_reward_functions_logged():
    rec = inspector_record(2, False)
    rec.logged = {"code_tests/verdict": ["ok: 3/3 tests passed", None, "1/3 tests failed; first: test 0: <x>"] * 2}
    insp = CompletionInspector(rec)
    html = insp.html.value
    assert '<td>code_tests/verdict</td><td colspan="2">ok: 3/3 tests passed</td>' in html
    assert "first: test 0: &lt;x&gt;</td>" in html and html.count("code_tests/verdict") == 2  # None: no row


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


def test_inspector_static_html():
    rec = dataclasses.replace(inspector_record(2, False), prompts=["is 1 < 2 & 3 > 2?", "second prompt"],
                              reward_names=["fmt<b>", "ans"], columns={"answer": ["<yes>", "2"]})
    insp = CompletionInspector([inspector_record(1, False), rec])
    page = insp.to_html()
    assert page.startswith('<div class="grpo-inspector"><b>step 2</b> &middot; prompt 0')
    assert "is 1 &lt; 2 &amp; 3 &gt; 2?" in page and "(gold answer &lt;yes&gt;)" in page  # escaped, unfolded:
    assert "<details open>" in page and insp.html.value.startswith("<details>")  # the widget folds it
    assert page.count('class="grpo-card"') == 3 and page.count("x&lt;y&gt;") == 3 and "<y>" not in page
    assert "<td>fmt&lt;b&gt;</td><td>&times;1</td><td>1</td>" in page
    assert "<td>ans</td><td>&times;1</td><td>n/a</td>" in page
    assert "total <b>2</b> advantage" in page and "+0.580" in page and "-1.150" in page
    other = insp.to_html(step=1, group=1)  # another step and prompt; the controls stay
    assert "<b>step 1</b> &middot; prompt 1" in other and "second prompt" in other and 'data-index="4"' in other
    assert (insp.step.value, insp.prompt.value, insp.shown) == (2, 0, [0, 1, 2]) and insp.to_html() == page


def test_inspector_unscorable_completion():
    rec = inspector_record(2, False)
    rec.rewards[1], rec.total[1], rec.advantages[1] = [None, None], None, 0.0  # no function applied (JSON: None)
    rec.total[2] = float("nan")  # as a tensor's tolist() gives it
    insp = CompletionInspector(rec)
    assert insp.html.value.count("total <b>unscorable</b>") == 2
    insp.filter.value = "best"  # unscorable completions are neither best nor worst
    assert insp.shown == [0]
    rec.total[0] = None
    insp.filter.value = "worst"
    assert insp.shown == [] and "no completion matches" in insp.html.value


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
    rec.columns = {"answer": ["4", "1"]}
    other = StepRecord(**{**rec.__dict__, "step": 8, "columns": {"answer": ["5", "1"]}})
    pg = RewardPlayground([rec, other], ["answer"])
    assert pg.step.value == 8  # the last step by default
    assert_state(pg, [0, 1, 0, 0, 1, 1, 1, 1], [by([-0.25, 0.75, -0.25, -0.25], 0.5 + EPS), [0] * 4], 1)
    pg.step.value = 7  # the gold answer of group 0 is now 4
    # [1,0,0,0]: mean .25, deviations [.75,-.25,-.25,-.25], sum of squares .75, std sqrt(.25) = .5
    assert_state(pg, [1, 0, 0, 0, 1, 1, 1, 1], [by([0.75, -0.25, -0.25, -0.25], 0.5 + EPS), [0] * 4], 1)


def chat_record() -> StepRecord:
    """A conversational step as the trainer stores it: the raw chat prompt in columns, the token ids."""
    chat = [[{"role": "user", "content": q}] for q in ("2+2?", "3+3?")]
    completions = ["<think>a</think>4", "4", "<think>b</think>5", "<think>c", "<think>d</think>6"] + ["6"] * 3
    return StepRecord(step=5, prompts=["<|user|>2+2?", "<|user|>3+3?"], completions=completions, reward_names=[],
                      rewards=[[]] * 8, reward_weights=[], total=[0.0] * 8, advantages=[0.0] * 8,
                      truncated=[False] * 8, lengths=[3, 8, 10, 12] * 2, num_generations=4,
                      columns={"prompt": chat, "answer": ["4", "6"]},
                      completion_ids=[[7] * n for n in (3, 8, 10, 12)] * 2)


def test_playground_calls_reward_functions_as_trl_does():
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    seen = {}

    def tutorial(completions, **kwargs):  # a reward function as TRL's docs write them
        seen.update(kwargs, completions=completions)
        return [float(len(c[0]["content"]) < 5) for c in completions]

    overlong = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    pg = RewardPlayground([chat_record()], [think_format_reward, overlong, tutorial])
    rec = chat_record()
    assert seen["prompts"][:5] == [rec.columns["prompt"][0]] * 4 + [rec.columns["prompt"][1]]  # raw, per completion
    assert seen["completions"][0] == [{"role": "assistant", "content": "<think>a</think>4"}]  # conversational
    assert seen["answer"] == ["4"] * 4 + ["6"] * 4 and seen["completion_ids"] == rec.completion_ids
    assert seen["trainer_state"].global_step == 5  # TRL's trainer_state at the record's step
    assert pg.scores.names == ["think_format_reward", "soft_overlong_punishment_reward", "tutorial"]
    # think: 1 where "<think>...</think>" opens the completion; overlong (L=10, cache 4): 0 up to 6 tokens,
    # (6 - len) / 4 up to 10, -1 beyond: lengths [3, 8, 10, 12] -> [0, -0.5, -1, -1]; tutorial: 1 under 5 chars
    assert pg.scores.as_lists()[:4] == [[1.0, 0.0, 0.0], [0.0, -0.5, 1.0], [1.0, -1.0, 0.0], [0.0, -1.0, 0.0]]
    torch.testing.assert_close(pg.totals[:4], torch.tensor([1.0, 0.5, 0.0, -1.0]))


def test_playground_unscorable_completions():
    def only_yes(completions, **kwargs):  # does not apply to anything but "yes..."
        return [4.0 if c.startswith("yes") else None for c in completions]

    pg = RewardPlayground([playground_record()], [only_yes])
    # group 0 [4, -, -, -]: one scorable completion, so no spread: every advantage 0; group 1: all 4
    assert pg.totals.isnan().tolist() == [False, True, True, True] + [False] * 4
    torch.testing.assert_close(pg.advantages, torch.zeros(2, 4))
    assert pg.zero_std_count == 2 and "unscorable completions: <b>3</b>" in pg.status.value
    page = pg.to_html()
    assert page.count("<td>unscorable</td>") == 3 and page.count("<td>n/a</td>") == 3
    assert bytes(pg.image.value).startswith(b"\x89PNG")


def test_playground_static_html():
    rec = playground_record()
    rec.completions[1] = "n<o>"
    pg = RewardPlayground([rec], [yes, bang], weights=[1.0, 0.5], regex="n.*")
    page = pg.to_html()
    assert page.startswith('<div class="grpo-playground"><b>step 7</b> &middot; std over group')
    assert "<th>yes &times;1</th><th>bang &times;0.5</th><th>regex &times;1</th>" in page
    # group 0 [4,1,1,1]: mean 1.75, std 1.5 -> advantages 1.5, -0.5; completion 1: yes 0, bang n/a, regex 1
    assert ("<tr><td>0</td><td>1</td><td><code>n&lt;o&gt;</code></td><td>0</td><td>n/a</td><td>1</td><td>1</td>"
            "<td>-0.500</td></tr>") in page
    # completion 7 "yes!": yes 4, bang 4 x 0.5, regex 0 -> 6; group 1 [4,4,4,6]: mean 4.5, std 1 -> 1.5
    assert ("<tr><td>1</td><td>3</td><td><code>yes!</code></td><td>4</td><td>4</td><td>0</td><td>6</td>"
            "<td>+1.500</td></tr>") in page
    assert "zero-variance groups: <b>0 / 2</b>" in page and "<o>" not in page
    png = base64.b64decode(page.split('src="data:image/png;base64,')[1].split('"')[0])
    assert png == bytes(pg.image.value) and png.startswith(b"\x89PNG")


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


def timed_record(step: int, seconds: float) -> StepRecord:
    rec = dashboard_record(step)
    rec.metrics["time/step_s"] = seconds
    return rec


def test_format_duration_and_eta_text():
    assert [format_duration(s) for s in (45, 720, 7500)] == ["45 s", "12 min", "2 h 05 min"]
    assert eta_text([], 5) == ""  # nothing measured yet
    # the median step time (robust to a slow first step) times the steps left, then the evaluation
    assert eta_text([100.0, 30.0, 36.0], 20, eval_seconds=60) == "ETA 12 min + ~1 min final evaluation"
    assert eta_text([30.0], 0, eval_seconds=60) == "training done, final evaluation ~1 min"
    assert eta_text([30.0], 0) == ""


def test_dashboard_eta_terminal(capsys):
    dash = TrainingDashboard(5, notebook=False, eval_seconds=60)
    dash.update(timed_record(1, 10.0))
    dash.update(timed_record(2, 600.0))
    dash.close()
    lines = capsys.readouterr().out.splitlines()
    # step 1: 4 steps x 10 s; step 2: 3 steps x median(10, 600) = 305 s -> 915 s = 15 min
    assert lines == ["ETA 40 s + ~1 min final evaluation for the 4 remaining steps",
                     "step 1/5  reward 0.25  kl 0.01  s/step 10  ETA 40 s + ~1 min final evaluation",
                     "step 2/5  reward 0.5  kl 0.02  s/step 600  ETA 15 min + ~1 min final evaluation"]


def test_dashboard_resumed_run_and_eta_in_notebook():
    dash = TrainingDashboard(10, notebook=True)
    dash.update(timed_record(6, 30.0))  # resumed after step 5: progress follows record.step
    assert dash.progress.value == 6 and dash.line.value.endswith("s/step 30  ETA 2 min</code>")  # 4 x 30 s
    terminal = TrainingDashboard(10, notebook=False)
    terminal.update(timed_record(6, 30.0))
    terminal.close()
    assert terminal.bar.n == 6


def test_dashboard_refreshes_its_own_display_at_the_end(monkeypatch):
    shown, updates = [], []
    handle = types.SimpleNamespace(update=updates.append)
    monkeypatch.setattr("IPython.display.display", lambda obj, display_id=None: shown.append(obj) or handle)
    dash = TrainingDashboard(2, notebook=True)
    dash.update(dashboard_record(1))
    assert shown == [dash] and updates == []  # displayed itself once, on the first step
    dash.update(dashboard_record(2))
    assert shown == [dash] and updates == [dash]  # the last step: the saved static view is the finished run


def test_dashboard_static_html():
    dash = TrainingDashboard(4, notebook=True, eval_seconds=120)
    assert dash.to_html() == "<p>training: 0/4 steps done</p>"
    for step in (1, 2):
        dash.update(timed_record(step, 3.0))
    page = dash.to_html()
    assert ("<code>step 2/4  reward 0.5  kl 0.02  s/step 3  ETA 6 s + ~2 min final evaluation</code>" in page)
    png = base64.b64decode(page.split('src="data:image/png;base64,')[1].split('"')[0])
    assert png.startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------------
# display: the live widget view plus the static HTML, on ipywidgets 7 and 8, and in Colab
# ----------------------------------------------------------------------------------------------


def displayables():
    dash = TrainingDashboard(3, notebook=True)
    dash.update(dashboard_record(1))
    return [CompletionInspector(inspector_record(2, True)), RewardPlayground([playground_record()], [yes, bang]),
            dash]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["inspector", "playground", "dashboard"])
def test_mimebundle_holds_widget_view_and_static_html(index):
    obj = displayables()[index]
    bundle = obj._repr_mimebundle_(include=None, exclude=None)  # as IPython's formatter calls it
    assert bundle[WIDGET_VIEW_MIME] == {"version_major": 2, "version_minor": 0, "model_id": obj.widget.model_id}
    assert bundle["text/html"] == obj.to_html() and bundle["text/html"].startswith("<div class=\"grpo-")
    assert bundle["text/plain"] == repr(obj) and "object at 0x" not in bundle["text/plain"]
    obj.widget.close()  # a closed widget has no view left: the static one stays
    assert set(obj._repr_mimebundle_()) == {"text/plain", "text/html"}


def test_terminal_dashboard_has_no_bundle():
    dash = TrainingDashboard(3, notebook=False)
    assert dash._repr_mimebundle_() is None
    dash.close()


@pytest.mark.skipif(not hasattr(ipywidgets.Widget, "on_displayed"), reason="ipywidgets 8 has no display callbacks")
def test_display_runs_ipywidgets7_display_callbacks():
    insp = CompletionInspector(inspector_record(2, False))
    fired = []
    insp.widget.on_displayed(lambda w: fired.append(w))
    insp.html.on_displayed(lambda w: fired.append(w))  # a grandchild: each Box passes the call on
    insp._repr_mimebundle_()
    assert len(fired) == 2 and insp.widget in fired and insp.html in fired


def fake_colab(monkeypatch, output):
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    monkeypatch.setattr(widgets, "_colab_manager_enabled", False)


def test_colab_custom_widget_manager_enabled_once(monkeypatch):
    calls = []
    fake_colab(monkeypatch, types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append(1)))
    insp = CompletionInspector(inspector_record(2, False))
    assert calls == []  # not before a display
    insp._repr_mimebundle_()
    RewardPlayground([playground_record()], [yes])._repr_mimebundle_()
    assert calls == [1]


def test_colab_without_the_call_still_displays(monkeypatch):
    fake_colab(monkeypatch, types.SimpleNamespace())  # no enable_custom_widget_manager
    assert WIDGET_VIEW_MIME in CompletionInspector(inspector_record(2, False))._repr_mimebundle_()


def test_no_colab_call_outside_colab(monkeypatch):
    monkeypatch.setattr(widgets, "_colab_manager_enabled", False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    CompletionInspector(inspector_record(2, False))._repr_mimebundle_()
    assert widgets._colab_manager_enabled is False
