"""The run doctor: each GRPO pathology, built as a synthetic run log, is diagnosed with the right check and
severity; real runs (tests/fixtures: the main job, a collapsed run, a run wrecked by its learning rate) get the
right findings with texts that hold; reward functions' declared ranges and kinds drive the diagnoses; TRL runs
are read from trainer_state.json; the terminal, HTML and CLI renderings and the live dashboard show findings."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grpo_lib import cli, doctor, runlog
from grpo_lib.advantages import advantage_stats, group_advantages
from grpo_lib.config import GRPOConfig
from grpo_lib.doctor import checks_not_run, diagnose, findings_html, format_findings
from grpo_lib.runlog import StepRecord, append_record, write_run_config
from grpo_lib.runview import load_run

FIXTURES = Path(__file__).parent / "fixtures"
G, GROUPS = 8, 4
DECLARED = {"format": ([0.0, 1.0], "format"), "answer": ([0.0, 1.0], "correctness")}


def healthy_metrics(t: float) -> dict:
    """Metrics of a run that learns: KL creeping up and levelling off, few truncations, entropy easing."""
    kl = 0.02 * (1 - math.exp(-3 * t))
    return {"kl/mean": kl, "loss": 0.04 * kl, "grad_norm": 0.5 + 0.1 * math.sin(7 * t),
            "completion/truncated_frac": 0.05, "completion/mean_length": 100.0 + 10 * t, "entropy/mean": 0.8 - 0.2 * t,
            "clip/low": 0.0, "clip/high": 0.0, "clip/region": 0.0, "ratio/mean": 1.0, "lr": 1e-5}


def record(step: int, per_fn: np.ndarray, weights=(1.0, 1.0), names=("format", "answer"), metrics=None,
           texts=None, declared=True) -> StepRecord:
    """A StepRecord of completion rewards per_fn [N, F] (NaN = does not apply), reward metrics computed as the
    trainer does, other metrics from `metrics`; texts: [N] completions (default: all distinct)."""
    missing = np.isnan(per_fn).all(axis=1)
    total = np.where(missing, np.nan, np.nansum(per_fn * np.array(weights), axis=1))
    rewards = torch.tensor(total, dtype=torch.float32).view(-1, G)
    adv, zero = group_advantages(rewards)
    m = {**advantage_stats(rewards, adv, zero), **(metrics or {})}
    for f, name in enumerate(names):
        col = per_fn[:, f]
        m[f"reward/{name}/mean"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
    n = len(per_fn)
    return StepRecord(
        step=step, prompts=["p"] * (n // G), completions=texts or [f"c{i}" for i in range(n)],
        reward_names=list(names), rewards=[[None if math.isnan(x) else x for x in row] for row in per_fn.tolist()],
        reward_weights=list(weights), total=[None if math.isnan(x) else x for x in total.tolist()],
        advantages=adv.flatten().tolist(), truncated=[False] * n, lengths=[10] * n, num_generations=G, metrics=m,
        reward_ranges=[DECLARED[x][0] if declared and x in DECLARED else None for x in names],
        reward_kinds=[DECLARED[x][1] if declared and x in DECLARED else None for x in names])


def make_run(n: int = 30, fmt=lambda t: 0.85 + 0.1 * t, ans=lambda t: 0.3 + 0.35 * t, weights=(1.0, 1.0),
             names=("format", "answer"), metrics=None, unscorable=lambda t: 0.0, seed: int = 0,
             declared=True) -> list[StepRecord]:
    """n StepRecords of a format + answer run: completion rewards drawn with the given success probabilities
    (functions of the run's progress t in [0, 1]); metrics from healthy_metrics, overridden by `metrics`
    {key: value or f(t)}."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        t = i / max(1, n - 1)
        per_fn = np.stack([rng.random(G * GROUPS) < fmt(t), rng.random(G * GROUPS) < ans(t)], 1).astype(float)
        per_fn[rng.random(G * GROUPS) < unscorable(t)] = np.nan
        m = {**healthy_metrics(t), **{k: v(t) if callable(v) else v for k, v in (metrics or {}).items()}}
        records.append(record(i + 1, per_fn, weights, names, m, declared=declared))
    return records


def metrics_only(path: Path, records: list[StepRecord]) -> Path:
    """A log.jsonl holding only step and metrics (how tests/fixtures stores a run): the doctor estimates the
    groups from the means."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "log.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"step": r.step, "metrics": runlog.StepRecord.to_dict(r)["metrics"]}) + "\n")
    return path


CONFIG = {"num_iterations": 1, "beta": 0.04, "loss_type": "grpo", "max_completion_length": 128,
          "max_grad_norm": 1.0, "epsilon": 0.2, "reward_funcs": ["format", "answer"], "saturation_threshold": None,
          "learning_rate": 2e-4}


def checks(findings, at_least: str = "info") -> dict[str, str]:
    """{check: severity} of the findings at or above a severity."""
    floor = doctor.SEVERITIES.index(at_least)
    return {f.check: f.severity for f in findings if doctor.SEVERITIES.index(f.severity) >= floor}


def alarms(findings) -> dict[str, str]:
    return checks(findings, "warning")


def finding(findings, check: str):
    return next(f for f in findings if f.check == check)


def fixture_lines(name: str) -> list[dict]:
    return [json.loads(s) for s in (FIXTURES / name).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# healthy runs: no false alarm
# ----------------------------------------------------------------------------------------------


def test_healthy_synthetic_run_raises_no_alarm():
    findings = diagnose(make_run(), CONFIG)
    assert alarms(findings) == {}, format_findings(findings)
    assert "loss_zero" in checks(findings)  # the one info: loss ~ beta * KL by construction


def test_main_job_fixture_is_saturation_not_collapse():
    """The real main job (cpu-tiny preset, 30 steps; see tests/fixtures/README.md): the format is known from the
    start, correctness climbs (mean reward 1.6 -> 2.0) and from step 23 on most groups are all-correct. That
    saturation is a true finding, at severity *info* (no 5 steps in a row had >= 90% of the groups saturated).
    The entropy fell 6-fold with it: at the maximal reward that is convergence, also *info*. The loss ~ beta * KL
    note is the third info. Collapse, or any warning, would be a false alarm."""
    config = json.loads((FIXTURES / "main_job_config.json").read_text())
    findings = diagnose(FIXTURES / "main_job_metrics.jsonl", config)
    assert alarms(findings) == {}, format_findings(findings)
    assert checks(findings) == {"saturation": "info", "loss_zero": "info", "entropy_collapse": "info"}, \
        format_findings(findings)
    # metrics only: all-correct share estimated as adv/zero_std_frac * position of the answer mean, steps 23-30
    lines = fixture_lines("main_job_metrics.jsonl")[-8:]
    expected = float(np.median([d["metrics"]["adv/zero_std_frac"] * d["metrics"]["reward/answer/mean"]
                                for d in lines]))
    sat = finding(findings, "saturation")
    assert sat.steps == (23, 30) and sat.figures["saturated_frac"] == pytest.approx(expected) and expected > 0.5
    assert sat.title == f"Mostly saturated: {expected:.0%} of groups are all-correct"
    assert "The training reward is maxed" in sat.advice  # reward 1.98 of 2


def collapse_expectations(lines: list[dict]) -> dict:
    """The group shares of the last window of a run, counted from its logged rewards by hand: zero variance of
    the total, all-correct = every answer reward 1, all-wrong = every answer reward 0."""
    k = max(3, round(len(lines) * 0.25))
    zero, correct, wrong = [], [], []
    for d in lines[-k:]:
        groups = [(d["total"][g * G:(g + 1) * G], [row[1] for row in d["rewards"][g * G:(g + 1) * G]])
                  for g in range(len(d["total"]) // G)]
        alike = [len(set(total)) == 1 for total, _ in groups]
        zero.append(np.mean(alike))
        correct.append(np.mean([a and all(x == 1.0 for x in ans) for a, (_, ans) in zip(alike, groups)]))
        wrong.append(np.mean([a and all(x == 0.0 for x in ans) for a, (_, ans) in zip(alike, groups)]))
    return {"zero": np.mean(zero), "correct": np.mean(correct), "wrong": np.mean(wrong)}


@pytest.mark.parametrize("steps", [8, 10])
def test_collapsed_run_fixture_is_collapse_not_saturation(tmp_path, steps):
    """The real collapsed run (cpu-tiny, lr 2e-4; notebook 05 stops at step 8): zero-variance groups that are
    all-correct *and* all-wrong, entropy down 0.296 -> 0.039 nats by step 8. The doctor says collapse, never
    "most groups are all-correct" nor "reward maxed: stop"."""
    lines = fixture_lines("collapse_run.jsonl")[:steps]
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in lines)
    (tmp_path / "config.json").write_text((FIXTURES / "collapse_run_config.json").read_text())
    findings = diagnose(tmp_path)
    assert set(checks(findings)) == {"collapse", "entropy_collapse", "loss_zero"}, format_findings(findings)
    want = collapse_expectations(lines)
    c = finding(findings, "collapse")
    assert c.severity == ("problem" if want["zero"] >= 0.8 else "warning")
    assert c.figures["zero_last"] == pytest.approx(want["zero"])
    assert c.figures["saturated_last"] == pytest.approx(want["correct"]) and want["correct"] == 0.5
    assert c.figures["stuck_last"] == pytest.approx(want["zero"] - want["correct"]) and want["zero"] > 0.5
    assert c.figures["all_wrong_last"] == pytest.approx(want["wrong"])
    assert (f"{want['zero']:.0%} of groups had zero reward variance" in c.evidence
            and f"{want['correct']:.0%} of groups all-correct and {want['zero'] - want['correct']:.0%} not"
            in c.evidence)
    assert "learning_rate=0.0002" in c.advice and "shortcut" in c.advice
    if steps == 8:  # the numbers the learner read in notebook 05
        assert "0.296 -> 0.0391 nats" in c.evidence
    text = format_findings(findings)
    assert "saturated" not in text.lower() and "maxed" not in text
    # from its metrics alone (the groups estimated from the means) the verdict is the same
    metrics_dir = metrics_only(tmp_path / "metrics", [StepRecord.from_dict({**EMPTY_RECORD, **d}) for d in lines])
    (metrics_dir / "config.json").write_text((FIXTURES / "collapse_run_config.json").read_text())
    assert checks(diagnose(metrics_dir)) == checks(findings)


EMPTY_RECORD = dict(prompts=[], completions=[], reward_names=[], rewards=[], reward_weights=[], total=[],
                    advantages=[], truncated=[], lengths=[], num_generations=G)


def test_destroyed_run_fixture_names_the_break_and_the_learning_rate():
    """The real run wrecked by learning_rate=0.05 (cpu-tiny otherwise): step 1 scores like any cpu-tiny run, the
    first update breaks the policy. The first finding is 'destroyed', naming the step it broke and the learning
    rate, with update-size advice; not 'reward stuck at its minimum', whose advice is for a task too hard."""
    lines = fixture_lines("destroyed_run.jsonl")
    config = json.loads((FIXTURES / "destroyed_run_config.json").read_text())
    findings = diagnose(FIXTURES / "destroyed_run.jsonl", config)
    rewards = [d["metrics"]["reward/mean"] for d in lines]
    broke = next(i for i, r in enumerate(rewards) if i > 0 and r <= 0.05 * 2.0)  # range 0..2 (format + answer)
    first = findings[0]
    assert first.check == "destroyed" and first.severity == "problem", format_findings(findings)
    assert first.title == f"The updates wrecked the policy at step {broke + 1} (learning_rate=0.05)"
    assert f"after {broke} update(s)" in first.evidence
    assert all(word in first.advice for word in ("learning_rate", "beta", "max_grad_norm"))
    assert "easier prompts" not in format_findings(findings)
    assert "no_signal" not in checks(findings) and "collapse" not in checks(findings)
    kl_after = max(d["metrics"]["kl/mean"] for d in lines[broke:])
    assert first.figures["kl_max_after"] == pytest.approx(kl_after)


# ----------------------------------------------------------------------------------------------
# each pathology
# ----------------------------------------------------------------------------------------------


def test_loss_zero_is_explained_only_at_one_iteration():
    run = make_run()
    found = finding(diagnose(run, CONFIG), "loss_zero")
    assert found.severity == "info" and "beta * KL" in found.advice and found.figures["loss_abs_median"] < 0.01
    assert "loss_zero" not in checks(diagnose(run, {**CONFIG, "num_iterations": 2}))
    big = make_run(metrics={"loss": 0.3})
    assert "loss_zero" not in checks(diagnose(big, CONFIG))
    # a large KL: the loss is 0.02, all of it beta * KL ("why does my loss go up?")
    kl_only = make_run(metrics={"kl/mean": 0.5, "loss": 0.04 * 0.5 + 1e-4})
    found = finding(diagnose(kl_only, CONFIG), "loss_zero")
    assert "just beta * KL" in found.title and found.figures["policy_term_median"] < 1e-3


def test_reward_stuck_at_zero_from_the_start_is_never_learned():
    run = make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0, metrics={"loss": 0.0, "kl/mean": 0.0})
    findings = diagnose(run, CONFIG)
    f = finding(findings, "no_signal")
    assert f.severity == "problem" and f.title == "Reward stuck at its minimum: no learning signal from the start"
    assert f.figures["no_signal_frac"] == 1.0
    assert all(word in f.advice for word in ("denser reward", "easier prompts", "temperature", "num_generations"))
    assert findings[0].severity == "problem"  # most severe first
    assert "destroyed" not in checks(findings) and "collapse" not in checks(findings)
    still = make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0, metrics={"loss": 0.0, "kl/mean": 0.0, "grad_norm": 0.0})
    loss_note = finding(diagnose(still, CONFIG), "loss_zero")
    assert "even the gradient is ~0" in loss_note.advice  # and not in a run that learns:
    assert "even the gradient" not in finding(diagnose(make_run(), CONFIG), "loss_zero").advice


def test_a_good_start_wrecked_by_the_update_is_destroyed_not_never_learned():
    """Steps 1-2 score like a working model (format 0.9, answers 0.4), then every completion is truncated
    garbage: reward 0, KL 4 nats. Without the violent signs (KL, truncation) the same fall is a decline."""
    crash = lambda t: t > 0.05  # noqa: E731 - from step 3 of 30
    run = make_run(fmt=lambda t: 0.0 if crash(t) else 0.9, ans=lambda t: 0.0 if crash(t) else 0.4,
                   metrics={"kl/mean": lambda t: 4.0 if crash(t) else 0.0,
                            "completion/truncated_frac": lambda t: 1.0 if crash(t) else 0.05})
    findings = diagnose(run, {**CONFIG, "learning_rate": 0.1})
    f = findings[0]
    assert f.check == "destroyed" and f.title == "The updates wrecked the policy at step 3 (learning_rate=0.1)"
    assert "after 2 update(s)" in f.evidence and "KL per token up to 4" in f.evidence
    assert "100% of completions truncated" in f.evidence
    assert {"no_signal", "reward_decline", "collapse"}.isdisjoint(checks(findings))
    late = lambda t: t > 0.5  # noqa: E731 - from step 16, and quietly: no KL, no truncation
    quiet = make_run(fmt=lambda t: 0.0 if late(t) else 0.9, ans=lambda t: 0.0 if late(t) else 0.4)
    assert "destroyed" not in checks(diagnose(quiet, CONFIG))
    assert checks(diagnose(quiet, CONFIG))["reward_decline"] == "warning"


def test_no_signal_from_metrics_alone_and_format_only_groups(tmp_path):
    # the format is learned but every answer is wrong: groups are all alike at total 1 (below the maximum 2)
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: 0.0)
    assert checks(diagnose(run, CONFIG))["no_signal"] == "problem"
    # no completions: the split is estimated from the answer mean's position
    assert checks(diagnose(metrics_only(tmp_path, run), CONFIG))["no_signal"] == "problem"
    partial = make_run(fmt=lambda t: 0.03, ans=lambda t: 0.0, seed=1)  # a rare format success: some signal
    assert checks(diagnose(partial, CONFIG)).get("no_signal") in ("warning", "problem")


def group_step(step: int, kinds: list[str], metrics: dict) -> StepRecord:
    """A step whose GROUPS groups are each 'correct' (G identical correct completions), 'wrong' (G identical
    wrong ones) or 'mixed' (half right, distinct texts)."""
    per_fn, texts = [], []
    for g, kind in enumerate(kinds):
        ans = [1.0] * G if kind == "correct" else [0.0] * G if kind == "wrong" else [1.0, 0.0] * (G // 2)
        per_fn += [[1.0, a] for a in ans]
        texts += [f"{kind}{g}"] * G if kind != "mixed" else [f"m{g}-{i}" for i in range(G)]
    return record(step, np.array(per_fn), metrics=metrics, texts=texts)


def test_collapse_counts_all_wrong_and_identical_groups():
    """10 steps: 4 mixed groups, then 2 identical all-correct + 2 identical all-wrong groups with the entropy
    gone: a collapse, its shares exact (50% all-correct, 50% all-wrong, 100% copies)."""
    run = [group_step(s, ["mixed"] * 4, {"entropy/mean": 0.5}) for s in range(1, 6)]
    run += [group_step(s, ["correct", "wrong", "correct", "wrong"], {"entropy/mean": 0.01}) for s in range(6, 11)]
    c = finding(diagnose(run, CONFIG), "collapse")
    assert c.severity == "problem" and c.steps == (1, 10)
    assert (c.figures["zero_first"], c.figures["zero_last"], c.figures["saturated_last"],
            c.figures["all_wrong_last"], c.figures["identical_last"]) == (0.0, 1.0, 0.5, 0.5, 1.0)
    assert "100% of groups were G copies of one completion" in c.evidence
    assert {"saturation", "no_signal"}.isdisjoint(checks(diagnose(run, CONFIG)))
    # the same groups all-correct: saturation, not collapse
    solved = run[:5] + [group_step(s, ["correct"] * 4, {"entropy/mean": 0.01}) for s in range(6, 11)]
    assert "collapse" not in checks(diagnose(solved, CONFIG))
    assert finding(diagnose(solved, CONFIG), "saturation").severity == "warning"


def test_most_means_more_than_half():
    base = [group_step(s, ["mixed"] * 4, {}) for s in range(1, 9)]
    half = base + [group_step(s, ["correct", "correct", "mixed", "mixed"], {}) for s in range(9, 13)]
    assert "saturation" not in checks(diagnose(half, CONFIG))  # 50% is not most
    three = base + [group_step(s, ["correct", "correct", "correct", "mixed"], {}) for s in range(9, 13)]
    sat = finding(diagnose(three, CONFIG), "saturation")
    assert sat.title == "Mostly saturated: 75% of groups are all-correct" and "a median 75%" in sat.evidence
    assert "reward is maxed" not in sat.advice  # mean reward 1.875 of 2: not maxed


def test_saturation_without_a_correctness_reward_is_the_top_reward():
    """A reward every completion earns (notebook 07's 'saturated' run): no function checks correctness, so a
    saturated group is one at the top of the reward's range, and the text says so."""
    run = [record(s, np.ones((G * GROUPS, 1)), weights=(1.0,), names=("always_satisfied",)) for s in (1, 2, 3)]
    f = finding(diagnose(run, CONFIG), "saturation")
    assert f.severity == "info" and f.title == "Saturated: 100% of groups are all at the top reward"
    assert "a median 100% of groups were all at the top reward; mean reward 1 of at most 1." in f.evidence


def test_saturation_warning_with_the_knobs_in_the_advice():
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: min(1.0, 0.4 + 1.2 * t))  # all-correct from t = 0.5
    f = finding(diagnose(run, CONFIG), "saturation")
    assert f.severity == "warning" and f.steps[1] == 30 and f.figures["saturated_streak"] >= 10
    assert "saturation_threshold" in f.advice and "dynamic_sampling" in f.advice
    assert "no_signal" not in checks(diagnose(run, CONFIG))  # all-correct is not "no reward"
    short = make_run(n=30, fmt=lambda t: 1.0, ans=lambda t: 1.0 if 0.55 < t < 0.9 else 0.5)  # saturated a while
    assert checks(diagnose(short, CONFIG)).get("saturation", "info") == "info"


def test_format_rising_while_answer_flat():
    run = make_run(fmt=lambda t: 0.1 + 0.9 * t, ans=lambda t: 0.15)
    f = finding(diagnose(run, CONFIG), "format_not_answer")
    assert f.severity == "warning" and "'format'" in f.title and "'answer'" in f.title
    assert "format_not_answer" not in checks(diagnose(make_run(fmt=lambda t: 0.1 + 0.9 * t,
                                                                ans=lambda t: 0.1 + 0.6 * t), CONFIG))


# ----------------------------------------------------------------------------------------------
# reward declarations: range and kind, recorded in the run, read by the doctor
# ----------------------------------------------------------------------------------------------


def test_builtin_rewards_declare_range_and_kind():
    from grpo_lib import rewards

    declared = {name: rewards.reward_declaration(fn) for name, fn in rewards.REWARD_FUNCS.items()}
    assert declared["format"] == ([0.0, 1.0], "format") and declared["answer"] == ([0.0, 1.0], "correctness")
    assert declared["xml_count"] == ([0.0, 0.5], "format") and declared["consistency"] == ([0.0, 1.0], "other")
    assert declared["length"] == ([0.0, 1.0], "other")
    assert rewards.reward_declaration(rewards.soft_overlong_punishment(100, 20)) == ([-1.0, 0.0], "other")
    assert rewards.reward_declaration(rewards.regex_reward("x", value=-2.0)) == ([-2.0, 0.0], "format")


def test_a_malformed_declaration_is_refused_by_name():
    from grpo_lib import rewards

    def mine(completions, **kwargs):
        return [1.0] * len(completions)

    mine.reward_range = (1.0, 0.0)
    with pytest.raises(rewards.RewardFunctionError, match=r"'mine' declares reward_range=\(1.0, 0.0\).*low < high"):
        rewards.score_completions([mine], ["p"], ["c"])
    mine.reward_range, mine.reward_kind = (0, 1), "accuracy"
    with pytest.raises(rewards.RewardFunctionError, match="'mine' declares reward_kind='accuracy'.*correctness"):
        rewards.score_completions([mine], ["p"], ["c"])
    mine.reward_kind = "correctness"
    scores = rewards.score_completions([mine, rewards.format_reward, lambda completions, **kw: [0.0]], ["p"], ["c"])
    assert scores.ranges == [[0.0, 1.0], [0.0, 1.0], None] and scores.kinds == ["correctness", "format", None]


def user_reward_run(declared: bool, n: int = 30) -> list[StepRecord]:
    """A user's own rewards 'shape' (a format check, 0/1) and 'score' (correctness in [-1, 1]): the shape is
    learned, the score stays at -1 except for rare hits."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        t = i / (n - 1)
        per_fn = np.stack([rng.random(G * GROUPS) < 0.2 + 0.8 * t,
                           np.where(rng.random(G * GROUPS) < 0.05, 1.0, -1.0)], 1).astype(float)
        r = record(i + 1, per_fn, names=("shape", "score"), metrics=healthy_metrics(t))
        r.reward_ranges, r.reward_kinds = ([[0.0, 1.0], [-1.0, 1.0]], ["format", "correctness"]) if declared \
            else ([], [])
        out.append(r)
    return out


def test_a_user_reward_gets_the_diagnoses_its_declaration_allows():
    config = {**CONFIG, "reward_funcs": []}
    found = diagnose(user_reward_run(declared=True), config)
    f = finding(found, "format_not_answer")
    assert "'shape'" in f.title and "'score'" in f.title
    view = load_run(user_reward_run(declared=True), config)
    assert view.ranges == {"shape": (0.0, 1.0), "score": (-1.0, 1.0)} and view.total_range == (-1.0, 2.0)
    # undeclared, the names say nothing: no format / correctness pair to compare
    assert "format_not_answer" not in checks(diagnose(user_reward_run(declared=False), config))
    assert load_run(user_reward_run(declared=False), config).kinds == {"shape": "other", "score": "other"}


@pytest.mark.parametrize("names", [("xml_structure", "correctness"), ("strict_format_reward", "accuracy_reward")])
def test_logs_without_declarations_fall_back_to_the_names(names):
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: 0.05, names=names, declared=False)  # format maxed, answers flat
    found = [f for f in diagnose(run, {**CONFIG, "reward_funcs": list(names)}) if f.check == "format_not_answer"]
    assert len(found) == 1 and names[0] in found[0].title and names[1] in found[0].title


def test_old_logs_of_builtin_rewards_use_their_declarations(tmp_path):
    """A log written before declarations were recorded: xml_count's range is its declared (0, 0.5), not the
    default (0, 1), so a group at 0.5 is at the top."""
    run = make_run(names=("xml_count", "answer"), declared=False, fmt=lambda t: 0.5)
    for r in run:
        r.rewards = [[None if x is None else 0.5 * x if f == 0 else x for f, x in enumerate(row)] for row in r.rewards]
    view = load_run(run, CONFIG)
    assert view.ranges["xml_count"] == (0.0, 0.5) and view.kinds == {"xml_count": "format", "answer": "correctness"}
    # the declarations recorded by the trainer are read back from log.jsonl
    for r in make_run(n=3):
        append_record(tmp_path, r)
    assert load_run(tmp_path).kinds == {"format": "format", "answer": "correctness"}
    line = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert line["reward_ranges"] == [[0.0, 1.0], [0.0, 1.0]] and line["reward_kinds"] == ["format", "correctness"]


# ----------------------------------------------------------------------------------------------
# the other checks
# ----------------------------------------------------------------------------------------------


def test_kl_growing_without_bound():
    run = make_run(metrics={"kl/mean": lambda t: 0.005 * math.exp(7 * t)})  # 0.005 -> 5.5
    f = finding(diagnose(run, CONFIG), "kl_growth")
    assert f.severity == "problem" and "growing" in f.title and f.figures["kl_last"] > 1.0
    moderate = make_run(metrics={"kl/mean": lambda t: 0.01 * math.exp(3.5 * t)})  # 0.01 -> 0.33, still climbing
    assert checks(diagnose(moderate, CONFIG))["kl_growth"] == "warning"
    levelled = make_run(metrics={"kl/mean": lambda t: 0.3 * (1 - math.exp(-8 * t))})  # high but flat
    assert "kl_growth" not in checks(diagnose(levelled, CONFIG))


def test_length_drifting_to_the_limit_and_truncation_rising():
    run = make_run(metrics={"completion/truncated_frac": lambda t: 0.02 + 0.6 * t,
                            "completion/mean_length": lambda t: 60 + 66 * t})
    f = finding(diagnose(run, CONFIG), "length")
    assert f.severity == "problem" and "rising" in f.title and "max_completion_length=128" in f.evidence
    drift = make_run(metrics={"completion/mean_length": lambda t: 60 + 55 * t})  # 60 -> 115 of 128, none truncated
    f = finding(diagnose(drift, CONFIG), "length")
    assert f.severity == "warning" and "drifting" in f.title
    assert "length" not in checks(diagnose(drift, {**CONFIG, "max_completion_length": None}))
    falling = make_run(metrics={"completion/truncated_frac": lambda t: 0.8 - 0.55 * t})  # learning to be brief
    assert checks(diagnose(falling, CONFIG))["length"] == "info"


def test_entropy_collapse():
    run = make_run(metrics={"entropy/mean": lambda t: 1.0 * math.exp(-3 * t)})  # 1.0 -> 0.05
    assert checks(diagnose(run, CONFIG))["entropy_collapse"] == "warning"
    dead = make_run(metrics={"entropy/mean": lambda t: 1.0 * math.exp(-6 * t)})  # -> 0.0025
    assert checks(diagnose(dead, CONFIG))["entropy_collapse"] == "problem"
    assert "collapse" not in checks(diagnose(dead, CONFIG))  # groups still vary: not a collapse of the groups
    without = make_run()
    for r in without:
        del r.metrics["entropy/mean"]  # runs logged before entropy/mean existed
    assert "entropy_collapse" not in checks(diagnose(without, CONFIG))
    assert checks_not_run(load_run(without, CONFIG))["entropy_collapse"] == "entropy/mean not in the log"


def test_clip_fraction_only_matters_at_several_iterations():
    run = make_run(metrics={"clip/region": 0.25, "ratio/mean": 1.05})
    f = finding(diagnose(run, {**CONFIG, "num_iterations": 4}), "clipping")
    assert f.severity == "warning" and "learning rate" in f.advice
    assert checks(diagnose(run, {**CONFIG, "num_iterations": 4, "beta": 0.0}))["clipping"] == "warning"
    assert "clipping" not in checks(diagnose(run, CONFIG))  # num_iterations=1: nothing is clipped by construction
    no_config = diagnose(run)  # num_iterations inferred from ratio/mean != 1
    assert checks(no_config)["clipping"] == "warning"


def test_one_reward_function_dominating(tmp_path):
    run = make_run(fmt=lambda t: 0.5, ans=lambda t: 0.5, weights=(10.0, 1.0))
    f = finding(diagnose(run, CONFIG), "reward_dominance")
    assert f.severity == "warning" and "'format'" in f.title and f.figures["share"] > 0.9
    assert "reward_dominance" not in checks(diagnose(make_run(fmt=lambda t: 0.5, ans=lambda t: 0.5), CONFIG))
    # from metrics alone (Bernoulli bound of each function's variance) the same verdict
    from_metrics = diagnose(metrics_only(tmp_path, run), {**CONFIG, "reward_weights": [10.0, 1.0]})
    assert checks(from_metrics)["reward_dominance"] == "warning"


def test_unscorable_completions():
    run = make_run(unscorable=lambda t: 0.3)
    f = finding(diagnose(run, CONFIG), "unscorable")
    assert f.severity == "warning" and 0.2 < f.figures["unscorable_frac"] < 0.4


def test_nonfinite_and_grad_spikes():
    run = make_run(metrics={"grad_norm": lambda t: 50.0 if round(29 * t) == 15 else 0.5})  # step 16
    f = finding(diagnose(run, CONFIG), "grad_spikes")
    assert f.severity == "warning" and f.steps == (16, 16)
    run[20].metrics["loss"] = None  # how the run log stores a NaN loss
    f = finding(diagnose(run, CONFIG), "nonfinite")
    assert f.severity == "problem" and f.evidence == "loss is NaN/inf at 1 step(s): 21." and f.steps == (21, 21)
    clipped = make_run(metrics={"grad_norm": 3.0})
    assert checks(diagnose(clipped, CONFIG))["grad_spikes"] == "info"  # clipping acts on every update


def test_a_loss_that_is_nan_at_every_step_is_found(tmp_path):
    """An fp16 overflow from the first step: every loss NaN (null in log.jsonl). Logged-but-NaN is not
    'not logged'; in fp16 (loss scale != 1) the advice is about fp16."""
    run = make_run(n=4, metrics={"loss": float("nan"), "grad_norm": float("nan"), "amp/loss_scale": 65536.0,
                                 "amp/step_skipped": 1.0})
    for r in run:
        append_record(tmp_path, r)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["metrics"]["loss"] is None
    f = finding(diagnose(tmp_path, CONFIG), "nonfinite")
    assert f.title == "Non-finite loss, grad_norm (fp16)" and f.steps == (1, 4)
    assert "loss is NaN/inf at 4 step(s): 1, 2, 3, 4" in f.evidence
    assert all(word in f.advice for word in ("overflow", "bfloat16", "float32", "65504"))
    plain = make_run(n=4, metrics={"loss": float("nan")})
    assert "fp16" not in finding(diagnose(plain, CONFIG), "nonfinite").title


def fp16_run(skips: list[int], n: int = 12) -> list[StepRecord]:
    """A fp16 run whose GradScaler skipped the given steps (halving its scale each time, doubling never)."""
    scale, run = 65536.0, make_run(n=n)
    for r in run:
        skipped = r.step in skips
        r.metrics.update({"amp/loss_scale": scale, "amp/step_skipped": float(skipped)})
        scale = scale / 2 if skipped else scale
    return run


def test_repeated_skipped_fp16_steps():
    assert "fp16_overflow" not in checks(diagnose(fp16_run([1]), CONFIG))  # the scale calibrating once: normal
    f = finding(diagnose(fp16_run([1, 7]), CONFIG), "fp16_overflow")
    assert f.severity == "warning" and f.title == "fp16 overflow: 2 optimiser steps skipped"
    assert "at 2 of 12 steps (1, 7), at most 1 in a row; loss scale 6.55e+04 at step 1 -> 1.64e+04" in f.evidence
    assert all(word in f.advice for word in ("bfloat16", "float32", "learning rate", "max_skipped_steps"))
    row = finding(diagnose(fp16_run([5, 6, 7]), CONFIG), "fp16_overflow")
    assert row.severity == "problem" and row.figures["skipped_in_a_row"] == 3 and row.steps == (5, 7)
    # the trainer's own stop (max_skipped_steps) sets how many in a row are a problem
    assert finding(diagnose(fp16_run([5, 6, 7]), {**CONFIG, "max_skipped_steps": 5}), "fp16_overflow").severity \
        == "warning"
    fp32 = make_run(metrics={"amp/loss_scale": 1.0, "amp/step_skipped": 0.0})  # no loss scaling: never skipped
    assert "fp16_overflow" not in checks(diagnose(fp32, CONFIG))


def test_reward_decline_and_flat_reward():
    falling = make_run(fmt=lambda t: 0.9, ans=lambda t: 0.8 - 0.7 * t)
    assert checks(diagnose(falling, CONFIG))["reward_decline"] == "warning"
    flat = make_run(fmt=lambda t: 0.5, ans=lambda t: 0.4)
    assert checks(diagnose(flat, CONFIG)).get("reward_flat") == "info"


def test_short_runs_only_get_level_checks():
    assert diagnose([], CONFIG) == []
    two = make_run(n=2, fmt=lambda t: 0.0, ans=lambda t: 0.0)
    assert diagnose(two, CONFIG) == []
    assert checks_not_run(load_run(two, CONFIG))["no_signal"] == "needs 3 steps, the run has 2"
    five = make_run(n=5, fmt=lambda t: 0.0, ans=lambda t: 0.0, metrics={"kl/mean": lambda t: 5.0 * t})
    assert set(checks(diagnose(five, CONFIG))) == {"no_signal"}  # a level, but no KL trend from 5 steps
    assert checks_not_run(load_run(five, {**CONFIG, "beta": 0.0}))["kl_growth"] == "needs 8 steps, the run has 5"


# ----------------------------------------------------------------------------------------------
# TRL: its metric names in our log, its trainer_state.json read by the doctor
# ----------------------------------------------------------------------------------------------


def test_step_metrics_carry_trl_names_beside_ours():
    from grpo_lib.rewards import score_completions
    from grpo_lib.trainer import step_metrics

    scores = score_completions(["format"], ["p"] * 4, ["<answer>1</answer>", "x", "<answer>2</answer>", "y"])
    rewards = scores.total.view(2, 2)
    adv, zero = group_advantages(rewards)
    rollout = SimpleNamespace(lengths=torch.tensor([3, 4, 5, 8]), truncated=torch.tensor([False, False, True, True]))
    train = {"loss": 0.1, "kl/mean": 0.02, "entropy/mean": 0.7, "clip/low": 0.0, "clip/high": 0.1, "clip/region": 0.1}
    m = step_metrics(scores, rewards, adv, zero, rollout, train, {"generate": 1.0, "score": 0.1}, 2e-4)
    pairs = {"reward/mean": "reward", "reward/std": "reward_std", "adv/zero_std_frac": "frac_reward_zero_std",
             "completion/mean_length": "completions/mean_length", "completion/truncated_frac":
             "completions/clipped_ratio", "kl/mean": "kl", "entropy/mean": "entropy", "clip/region":
             "clip_ratio/region_mean", "clip/high": "clip_ratio/high_mean", "reward/format/mean": "rewards/format/mean",
             "lr": "learning_rate"}
    for ours, theirs in pairs.items():
        assert m[theirs] == m[ours], (ours, theirs)
    assert (m["reward"], m["completions/mean_length"], m["completions/clipped_ratio"]) == (0.5, 5.0, 0.5)
    assert m["reward_std"] == pytest.approx(float(np.std([1, 0, 1, 0], ddof=1)))  # TRL's nanstd: unbiased


def trl_state(records: list[StepRecord]) -> dict:
    """The trainer_state.json TRL would write for these steps: log_history with TRL's names only (what TRL
    logs: no unscorable share, no amp/ metrics), and the end-of-run summary entry."""
    history = [{"step": r.step, "epoch": 0.1 * r.step, "loss": r.metrics["loss"], "grad_norm": r.metrics["grad_norm"],
                **runlog.trl_aliases(r.metrics)} for r in records]
    return {"global_step": len(records), "max_steps": len(records),
            "log_history": history + [{"step": len(records), "train_runtime": 12.5, "train_loss": 0.01}]}


def test_trl_trainer_state_gets_the_same_diagnosis(tmp_path, capsys):
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: min(1.0, 0.4 + 1.2 * t),
                   metrics={"kl/mean": lambda t: 0.005 * math.exp(7 * t)})  # saturation and KL growth
    out = tmp_path / "trl_out"
    (out / "checkpoint-20").mkdir(parents=True)
    (out / "checkpoint-30").mkdir()
    (out / "checkpoint-20" / "trainer_state.json").write_text(json.dumps(trl_state(run[:20])))
    (out / "checkpoint-30" / "trainer_state.json").write_text(json.dumps(trl_state(run)))
    view = load_run(out, CONFIG)
    assert view.source == "trl" and view.n == 30  # the newest checkpoint's state, the summary entry left out
    assert np.allclose(view.col("reward/mean"), [r.metrics["reward/mean"] for r in run])
    assert np.allclose(view.col("reward/answer/mean"), [r.metrics["reward/answer/mean"] for r in run])
    ours = metrics_only(tmp_path / "ours", run)
    assert checks(diagnose(view)) == checks(diagnose(ours, CONFIG))
    assert {"saturation", "kl_growth"} <= set(checks(diagnose(view)))
    not_run = checks_not_run(view)
    assert not_run == {"fp16_overflow": "TRL logs no counterpart of amp/step_skipped",
                       "unscorable": "TRL logs no counterpart of reward/unscorable_frac"}
    (tmp_path / "cfg.yaml").write_text("preset: cpu-tiny\nbeta: 0.04\n")
    assert cli.main(["doctor", str(out), "--config", str(tmp_path / "cfg.yaml")]) == 0
    text = capsys.readouterr().out
    assert "KL to the reference is growing" in text
    assert "could not run: fp16_overflow (TRL logs no counterpart of amp/step_skipped); unscorable (TRL logs no " \
        "counterpart of reward/unscorable_frac)" in text.replace("\n    ", " ")


@pytest.mark.slow
def test_doctor_reads_a_real_trl_run(tmp_path, capsys):
    """2 steps of scripts/train_trl.py (TRL's GRPOTrainer, the embedded model, cpu-tiny with tiny settings): the
    doctor maps TRL's log_history onto its columns and says which checks could not run (2 steps)."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("train_trl", root / "scripts" / "train_trl.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "trl"
    argv = ["--config", str(root / "configs" / "cpu-tiny.yaml"), "--output-dir", str(out)]
    for k, v in dict(prompts_per_step=2, num_generations=2, max_completion_length=12, max_steps=2, save_steps=0,
                     lora_r=8, lora_alpha=16).items():
        argv += ["--set", f"{k}={v}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin-wait: on a busy 2-core machine one thread is faster
    try:
        trainer = script.run(argv)
    finally:
        torch.set_num_threads(threads)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    view = load_run(out)
    assert view.source == "trl" and list(view.steps) == [1, 2]
    for key, trl in (("reward/mean", "reward"), ("adv/zero_std_frac", "frac_reward_zero_std"), ("kl/mean", "kl"),
                     ("entropy/mean", "entropy"), ("completion/truncated_frac", "completions/clipped_ratio"),
                     ("reward/answer/mean", "rewards/answer/mean"), ("loss", "loss")):
        assert np.allclose(view.col(key), [h[trl] for h in logged], equal_nan=True), key
    assert view.kinds == {"format": "format", "answer": "correctness"}  # the built-ins' declarations, by name
    config = GRPOConfig.from_yaml(root / "configs" / "cpu-tiny.yaml")
    assert load_run(out, config).reward_names == ["format", "answer"]  # TRL sorts its keys: the config's order
    capsys.readouterr()
    assert cli.main(["doctor", str(out)]) == 0
    text = capsys.readouterr().out.replace("\n    ", " ")
    assert text.startswith("run doctor: ")
    assert "fp16_overflow (TRL logs no counterpart of amp/step_skipped)" in text
    assert "unscorable (TRL logs no counterpart of reward/unscorable_frac)" in text
    assert "destroyed, no_signal, collapse, saturation, length, clipping, reward_dominance, loss_zero (needs 3 " \
        "steps, the run has 2)" in text


# ----------------------------------------------------------------------------------------------
# inputs and renderings
# ----------------------------------------------------------------------------------------------


def test_run_directory_with_config_json(tmp_path):
    for r in make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0):
        append_record(tmp_path, r)
    write_run_config(tmp_path, {**CONFIG, "num_iterations": 2})
    from_dir = diagnose(tmp_path)
    assert "no_signal" in checks(from_dir) and "loss_zero" not in checks(from_dir)  # read num_iterations=2
    assert checks(diagnose(tmp_path / "log.jsonl")) == checks(from_dir)
    assert "loss_zero" in checks(diagnose(tmp_path, CONFIG))  # an explicit config wins
    assert "loss_zero" not in checks(diagnose(tmp_path, GRPOConfig(num_iterations=2)))  # a GRPOConfig too


def test_format_and_html():
    findings = diagnose(make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0), CONFIG)
    text = format_findings(findings)
    assert text.splitlines()[0].startswith("run doctor: ") and "[PROBLEM] Reward stuck" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "    evidence: " in text and "    advice: " in text
    assert format_findings([]) == "run doctor: no findings: nothing looks wrong"
    assert format_findings([], not_run={"kl_growth": "beta=0: no KL term, no KL logged"}).splitlines()[1] == \
        "could not run: kl_growth (beta=0: no KL term, no KL logged)"
    page = findings_html(findings + [doctor.Finding("x", "info", "<b>", "a & b", "c")])
    assert page.startswith('<div class="grpo-doctor">') and "&lt;b&gt;" in page and "a &amp; b" in page
    assert json.loads(doctor.findings_json(findings))[0]["check"] == findings[0].check


def test_cli_doctor(tmp_path, capsys):
    assert cli.main(["doctor", str(tmp_path)]) == 0  # a run dir without a log: one clear line
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no run log" in out and "trainer_state.json" in out
    for r in make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0, n=5):
        del r.metrics["entropy/mean"]
        append_record(tmp_path, r)
    write_run_config(tmp_path, CONFIG)
    assert cli.main(["doctor", str(tmp_path)]) == 0  # findings, even problems, exit 0
    out = capsys.readouterr().out
    assert "[PROBLEM] Reward stuck at its minimum" in out
    assert out.replace("\n    ", " ").rstrip().splitlines()[-1] == (
        "could not run: fp16_overflow (amp/step_skipped not in the log); format_not_answer, kl_growth, grad_spikes, "
        "reward_trend (needs 8 steps, the run has 5); entropy_collapse (entropy/mean not in the log)")
    assert cli.main(["doctor", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["check"] == "no_signal"
    assert cli.main(["doctor", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dashboard_shows_findings_live(capsys):
    from grpo_lib.widgets import TrainingDashboard

    run = make_run(n=10, fmt=lambda t: 0.0, ans=lambda t: 0.0)
    dash = TrainingDashboard(10, notebook=True, config=CONFIG, doctor_every=5)
    for r in run[:4]:
        dash.update(r)
    assert dash.doctor.value == ""  # not evaluated before step 5
    dash.update(run[4])
    assert "Reward stuck at its minimum" in dash.doctor.value and dash.findings[0].check == "no_signal"
    assert 'class="grpo-doctor"' in dash.to_html() and "Reward stuck" in dash.to_html()

    terminal = TrainingDashboard(10, notebook=False, config=CONFIG, doctor_every=5)
    for r in run:
        terminal.update(r)
    terminal.close()
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("doctor:")]
    assert len(notes) == 1 and notes[0].startswith("doctor: [PROBLEM] Reward stuck")  # new alarms once


def test_a_failing_doctor_never_stops_training(monkeypatch):
    from grpo_lib import widgets

    def broken(*args, **kwargs):
        raise ZeroDivisionError("bug")

    # the module whose diagnose the dashboard calls (its terminal base class's, wherever that lives)
    monkeypatch.setattr(sys.modules[widgets.TrainingDashboard._diagnose.__module__], "diagnose", broken)
    dash = widgets.TrainingDashboard(5, notebook=True, config=CONFIG, doctor_every=5)
    with pytest.warns(UserWarning, match="run doctor failed .*ZeroDivisionError.*training goes on"):
        for r in make_run(n=5):
            dash.update(r)
    assert dash.progress.value == 5 and dash.findings == []
