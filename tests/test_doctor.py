"""The run doctor: each GRPO pathology, built as a synthetic run log, is diagnosed with the right check and
severity; a healthy synthetic run and the real main job (tests/fixtures) raise no false alarm; the terminal,
HTML and CLI renderings and the live dashboard show the findings."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_lib import cli, doctor
from grpo_lib.advantages import advantage_stats, group_advantages
from grpo_lib.doctor import diagnose, findings_html, format_findings
from grpo_lib.runlog import StepRecord, append_record, metrics_table, write_run_config

FIXTURES = Path(__file__).parent / "fixtures"
G, GROUPS = 8, 4


def healthy_metrics(t: float) -> dict:
    """Metrics of a run that learns: KL creeping up and levelling off, few truncations, entropy easing."""
    kl = 0.02 * (1 - math.exp(-3 * t))
    return {"kl/mean": kl, "loss": 0.04 * kl, "grad_norm": 0.5 + 0.1 * math.sin(7 * t),
            "completion/truncated_frac": 0.05, "completion/mean_length": 100.0 + 10 * t, "entropy/mean": 0.8 - 0.2 * t,
            "clip/low": 0.0, "clip/high": 0.0, "clip/region": 0.0, "ratio/mean": 1.0, "lr": 1e-5}


def make_run(n: int = 30, fmt=lambda t: 0.85 + 0.1 * t, ans=lambda t: 0.3 + 0.35 * t, weights=(1.0, 1.0),
             names=("format", "answer"), metrics=None, unscorable=lambda t: 0.0, seed: int = 0) -> list[StepRecord]:
    """n StepRecords of a format + answer run: completion rewards drawn with the given success probabilities
    (functions of the run's progress t in [0, 1]); reward metrics computed as the trainer does; other metrics
    from healthy_metrics, overridden by `metrics` {key: value or f(t)}."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        t = i / max(1, n - 1)
        per_fn = np.stack([rng.random(G * GROUPS) < fmt(t), rng.random(G * GROUPS) < ans(t)], 1).astype(float)
        missing = rng.random(G * GROUPS) < unscorable(t)
        per_fn[missing] = np.nan
        total = np.where(missing, np.nan, per_fn @ np.array(weights))
        rewards = torch.tensor(total, dtype=torch.float32).view(GROUPS, G)
        adv, zero = group_advantages(rewards)
        m = {**advantage_stats(rewards, adv, zero), **healthy_metrics(t)}
        for f, name in enumerate(names):
            m[f"reward/{name}/mean"] = float(np.nanmean(per_fn[:, f])) if (~missing).any() else float("nan")
        for k, v in (metrics or {}).items():
            m[k] = v(t) if callable(v) else v
        records.append(StepRecord(
            step=i + 1, prompts=["p"] * GROUPS, completions=["c"] * (G * GROUPS), reward_names=list(names),
            rewards=[[None if math.isnan(x) else x for x in row] for row in per_fn.tolist()],
            reward_weights=list(weights), total=[None if math.isnan(x) else x for x in total.tolist()],
            advantages=adv.flatten().tolist(), truncated=[False] * (G * GROUPS), lengths=[10] * (G * GROUPS),
            num_generations=G, metrics=m))
    return records


CONFIG = {"num_iterations": 1, "beta": 0.04, "loss_type": "grpo", "max_completion_length": 128,
          "max_grad_norm": 1.0, "epsilon": 0.2, "reward_funcs": ["format", "answer"], "saturation_threshold": None}


def checks(findings, at_least: str = "info") -> dict[str, str]:
    """{check: severity} of the findings at or above a severity."""
    floor = doctor.SEVERITIES.index(at_least)
    return {f.check: f.severity for f in findings if doctor.SEVERITIES.index(f.severity) >= floor}


def alarms(findings) -> dict[str, str]:
    return checks(findings, "warning")


# ----------------------------------------------------------------------------------------------
# healthy runs: no false alarm
# ----------------------------------------------------------------------------------------------


def test_healthy_synthetic_run_raises_no_alarm():
    findings = diagnose(make_run(), CONFIG)
    assert alarms(findings) == {}, format_findings(findings)
    assert "loss_zero" in checks(findings)  # the one info: loss ~ beta * KL by construction


def test_main_job_fixture_raises_no_false_alarm():
    """The real main job (cpu-tiny preset, 30 steps; see tests/fixtures/README.md): the format is known from the
    start, correctness climbs (mean reward 1.6 -> 2.0) and from step 23 on most groups (a median 88%) are
    all-correct. That saturation is a true finding; it is reported at severity *info* because no 5 steps in a
    row had >= 90% of the groups saturated (that would make it a warning). The entropy fell 6-fold with it: at
    the maximal reward that is convergence, also *info*. The loss ~ beta * KL note is the third info. Any
    warning or problem would be a false alarm."""
    config = json.loads((FIXTURES / "main_job_config.json").read_text())
    findings = diagnose(FIXTURES / "main_job_metrics.jsonl", config)
    assert alarms(findings) == {}, format_findings(findings)
    assert checks(findings) == {"saturation": "info", "loss_zero": "info", "entropy_collapse": "info"}, \
        format_findings(findings)
    sat = next(f for f in findings if f.check == "saturation")
    assert sat.steps == (23, 30) and 0.5 <= sat.figures["saturated_frac"] < 0.9
    # the same log as a metrics table gives the same diagnosis
    lines = [json.loads(s) for s in (FIXTURES / "main_job_metrics.jsonl").read_text().splitlines()]
    table = metrics_table([StepRecord.from_dict({**EMPTY_RECORD, **d}) for d in lines])
    assert checks(diagnose(table, config)) == checks(findings)


EMPTY_RECORD = dict(prompts=[], completions=[], reward_names=[], rewards=[], reward_weights=[], total=[],
                    advantages=[], truncated=[], lengths=[], num_generations=G)


# ----------------------------------------------------------------------------------------------
# each pathology
# ----------------------------------------------------------------------------------------------


def test_loss_zero_is_explained_only_at_one_iteration():
    run = make_run()
    found = next(f for f in diagnose(run, CONFIG) if f.check == "loss_zero")
    assert found.severity == "info" and "beta * KL" in found.advice and found.figures["loss_abs_median"] < 0.01
    assert "loss_zero" not in checks(diagnose(run, {**CONFIG, "num_iterations": 2}))
    big = make_run(metrics={"loss": 0.3})
    assert "loss_zero" not in checks(diagnose(big, CONFIG))
    # a large KL: the loss is 0.02, all of it beta * KL ("why does my loss go up?")
    kl_only = make_run(metrics={"kl/mean": 0.5, "loss": 0.04 * 0.5 + 1e-4})
    found = next(f for f in diagnose(kl_only, CONFIG) if f.check == "loss_zero")
    assert "just beta * KL" in found.title and found.figures["policy_term_median"] < 1e-3


def test_reward_stuck_at_zero_is_a_problem():
    run = make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0, metrics={"loss": 0.0, "kl/mean": 0.0})
    findings = diagnose(run, CONFIG)
    f = next(f for f in findings if f.check == "no_signal")
    assert f.severity == "problem" and "minimum" in f.title and f.figures["no_signal_frac"] == 1.0
    assert all(word in f.advice for word in ("denser reward", "easier prompts", "temperature", "num_generations"))
    assert findings[0].severity == "problem"  # most severe first
    still = make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0, metrics={"loss": 0.0, "kl/mean": 0.0, "grad_norm": 0.0})
    loss_note = next(f for f in diagnose(still, CONFIG) if f.check == "loss_zero")
    assert "even the gradient is ~0" in loss_note.advice  # and not in a run that learns:
    assert "even the gradient" not in next(f for f in diagnose(make_run(), CONFIG) if f.check == "loss_zero").advice


def test_no_signal_from_metrics_alone_and_format_only_groups():
    # the format is learned but every answer is wrong: groups are all alike at total 1 (below the maximum 2)
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: 0.0)
    assert checks(diagnose(run, CONFIG))["no_signal"] == "problem"
    table = metrics_table(run)  # no completions: the split is estimated from the mean's position
    assert checks(diagnose(table, CONFIG))["no_signal"] == "problem"
    partial = make_run(fmt=lambda t: 0.03, ans=lambda t: 0.0, seed=1)  # a rare format success: some signal
    assert checks(diagnose(partial, CONFIG)).get("no_signal") in ("warning", "problem")


def test_saturation_warning_with_the_knobs_in_the_advice():
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: min(1.0, 0.4 + 1.2 * t))  # all-correct from t = 0.5
    f = next(f for f in diagnose(run, CONFIG) if f.check == "saturation")
    assert f.severity == "warning" and f.steps[1] == 30 and f.figures["saturated_streak"] >= 10
    assert "saturation_threshold" in f.advice and "dynamic_sampling" in f.advice
    assert "no_signal" not in checks(diagnose(run, CONFIG))  # all-correct is not "no reward"
    short = make_run(n=30, fmt=lambda t: 1.0, ans=lambda t: 1.0 if 0.55 < t < 0.9 else 0.5)  # saturated a while
    assert checks(diagnose(short, CONFIG)).get("saturation", "info") == "info"


def test_format_rising_while_answer_flat():
    run = make_run(fmt=lambda t: 0.1 + 0.9 * t, ans=lambda t: 0.15)
    f = next(f for f in diagnose(run, CONFIG) if f.check == "format_not_answer")
    assert f.severity == "warning" and "'format'" in f.title and "'answer'" in f.title
    assert "format_not_answer" not in checks(diagnose(make_run(fmt=lambda t: 0.1 + 0.9 * t,
                                                                ans=lambda t: 0.1 + 0.6 * t), CONFIG))


@pytest.mark.parametrize("names", [("xml_structure", "correctness"), ("strict_format_reward", "accuracy_reward")])
def test_format_and_answer_names_are_recognised(names):
    run = make_run(fmt=lambda t: 1.0, ans=lambda t: 0.05, names=names)  # format maxed, answers rare and flat
    found = [f for f in diagnose(run, {**CONFIG, "reward_funcs": list(names)}) if f.check == "format_not_answer"]
    assert len(found) == 1 and names[0] in found[0].title and names[1] in found[0].title


def test_kl_growing_without_bound():
    run = make_run(metrics={"kl/mean": lambda t: 0.005 * math.exp(7 * t)})  # 0.005 -> 5.5
    f = next(f for f in diagnose(run, CONFIG) if f.check == "kl_growth")
    assert f.severity == "problem" and "growing" in f.title and f.figures["kl_last"] > 1.0
    moderate = make_run(metrics={"kl/mean": lambda t: 0.01 * math.exp(3.5 * t)})  # 0.01 -> 0.33, still climbing
    assert checks(diagnose(moderate, CONFIG))["kl_growth"] == "warning"
    levelled = make_run(metrics={"kl/mean": lambda t: 0.3 * (1 - math.exp(-8 * t))})  # high but flat
    assert "kl_growth" not in checks(diagnose(levelled, CONFIG))


def test_length_drifting_to_the_limit_and_truncation_rising():
    run = make_run(metrics={"completion/truncated_frac": lambda t: 0.02 + 0.6 * t,
                            "completion/mean_length": lambda t: 60 + 66 * t})
    f = next(f for f in diagnose(run, CONFIG) if f.check == "length")
    assert f.severity == "problem" and "rising" in f.title and "max_completion_length=128" in f.evidence
    drift = make_run(metrics={"completion/mean_length": lambda t: 60 + 55 * t})  # 60 -> 115 of 128, none truncated
    f = next(f for f in diagnose(drift, CONFIG) if f.check == "length")
    assert f.severity == "warning" and "drifting" in f.title
    assert "length" not in checks(diagnose(drift, {**CONFIG, "max_completion_length": None}))
    falling = make_run(metrics={"completion/truncated_frac": lambda t: 0.8 - 0.55 * t})  # learning to be brief
    assert checks(diagnose(falling, CONFIG))["length"] == "info"


def test_entropy_collapse():
    run = make_run(metrics={"entropy/mean": lambda t: 1.0 * math.exp(-3 * t)})  # 1.0 -> 0.05
    assert checks(diagnose(run, CONFIG))["entropy_collapse"] == "warning"
    dead = make_run(metrics={"entropy/mean": lambda t: 1.0 * math.exp(-6 * t)})  # -> 0.0025
    assert checks(diagnose(dead, CONFIG))["entropy_collapse"] == "problem"
    without = make_run()
    for r in without:
        del r.metrics["entropy/mean"]  # runs logged before entropy/mean existed
    assert "entropy_collapse" not in checks(diagnose(without, CONFIG))


def test_clip_fraction_only_matters_at_several_iterations():
    run = make_run(metrics={"clip/region": 0.25, "ratio/mean": 1.05})
    f = next(f for f in diagnose(run, {**CONFIG, "num_iterations": 4}) if f.check == "clipping")
    assert f.severity == "warning" and "learning rate" in f.advice
    assert checks(diagnose(run, {**CONFIG, "num_iterations": 4, "beta": 0.0}))["clipping"] == "warning"
    assert "clipping" not in checks(diagnose(run, CONFIG))  # num_iterations=1: nothing is clipped by construction
    no_config = diagnose(run)  # num_iterations inferred from ratio/mean != 1
    assert checks(no_config)["clipping"] == "warning"


def test_one_reward_function_dominating():
    run = make_run(fmt=lambda t: 0.5, ans=lambda t: 0.5, weights=(10.0, 1.0))
    f = next(f for f in diagnose(run, CONFIG) if f.check == "reward_dominance")
    assert f.severity == "warning" and "'format'" in f.title and f.figures["share"] > 0.9
    assert "reward_dominance" not in checks(diagnose(make_run(fmt=lambda t: 0.5, ans=lambda t: 0.5), CONFIG))
    # from metrics alone (Bernoulli bound of each function's variance) the same verdict
    from_table = diagnose(metrics_table(run), {**CONFIG, "reward_weights": [10.0, 1.0]})
    assert checks(from_table)["reward_dominance"] == "warning"


def test_unscorable_completions():
    run = make_run(unscorable=lambda t: 0.3)
    f = next(f for f in diagnose(run, CONFIG) if f.check == "unscorable")
    assert f.severity == "warning" and 0.2 < f.figures["unscorable_frac"] < 0.4


def test_nonfinite_and_grad_spikes():
    run = make_run(metrics={"grad_norm": lambda t: 50.0 if round(29 * t) == 15 else 0.5})  # step 16
    f = next(f for f in diagnose(run, CONFIG) if f.check == "grad_spikes")
    assert f.severity == "warning" and f.steps == (16, 16)
    run[20].metrics["loss"] = None  # how the run log stores a NaN loss
    f = next(f for f in diagnose(run, CONFIG) if f.check == "nonfinite")
    assert f.severity == "problem" and "21" in f.evidence
    clipped = make_run(metrics={"grad_norm": 3.0})
    assert checks(diagnose(clipped, CONFIG))["grad_spikes"] == "info"  # clipping acts on every update


def test_reward_decline_and_flat_reward():
    falling = make_run(fmt=lambda t: 0.9, ans=lambda t: 0.8 - 0.7 * t)
    assert checks(diagnose(falling, CONFIG))["reward_decline"] == "warning"
    flat = make_run(fmt=lambda t: 0.5, ans=lambda t: 0.4)
    assert checks(diagnose(flat, CONFIG)).get("reward_flat") == "info"


def test_short_runs_only_get_level_checks():
    assert diagnose([], CONFIG) == []
    two = make_run(n=2, fmt=lambda t: 0.0, ans=lambda t: 0.0)
    assert diagnose(two, CONFIG) == []
    five = make_run(n=5, fmt=lambda t: 0.0, ans=lambda t: 0.0, metrics={"kl/mean": lambda t: 5.0 * t})
    assert set(checks(diagnose(five, CONFIG))) == {"no_signal"}  # a level, but no KL trend from 5 steps


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
    from grpo_lib.config import GRPOConfig

    assert "loss_zero" not in checks(diagnose(tmp_path, GRPOConfig(num_iterations=2)))  # a GRPOConfig too


def test_format_and_html():
    findings = diagnose(make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0), CONFIG)
    text = format_findings(findings)
    assert text.splitlines()[0].startswith("run doctor: ") and "[PROBLEM] Reward stuck" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "    evidence: " in text and "    advice: " in text
    assert format_findings([]) == "run doctor: no findings: nothing looks wrong"
    page = findings_html(findings + [doctor.Finding("x", "info", "<b>", "a & b", "c")])
    assert page.startswith('<div class="grpo-doctor">') and "&lt;b&gt;" in page and "a &amp; b" in page
    assert json.loads(doctor.findings_json(findings))[0]["check"] == findings[0].check


def test_cli_doctor(tmp_path, capsys):
    assert cli.main(["doctor", str(tmp_path)]) == 0  # a run dir without a log: one clear line
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no run log" in out
    for r in make_run(fmt=lambda t: 0.0, ans=lambda t: 0.0):
        append_record(tmp_path, r)
    write_run_config(tmp_path, CONFIG)
    assert cli.main(["doctor", str(tmp_path)]) == 0  # findings, even problems, exit 0
    assert "[PROBLEM] Reward stuck at its minimum" in capsys.readouterr().out
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

    monkeypatch.setattr(widgets, "diagnose", broken)
    dash = widgets.TrainingDashboard(5, notebook=True, config=CONFIG, doctor_every=5)
    with pytest.warns(UserWarning, match="run doctor failed .*ZeroDivisionError.*training goes on"):
        for r in make_run(n=5):
            dash.update(r)
    assert dash.progress.value == 5 and dash.findings == []
