"""report_to: TensorBoard event files read back with TensorBoard's own reader (a resumed run's redone steps
show once), trackio and W&B driven through stand-in modules, and a missing package is a clear error."""

import json
import sys
import types

import pytest

from grpo_lib.config import ConfigError, GRPOConfig
from grpo_lib.tracking import STATE_NAME, Tracker, TrackingError, normalize_report_to, scalar_metrics


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics(step: int, scale: float = 1.0) -> dict:
    return {"reward/mean": 0.1 * step * scale, "kl/mean": 0.01 * step, "loss": None, "flag": True, "name": "x"}


def test_tensorboard_writes_each_step(tmp_path):
    with Tracker(("tensorboard",), tmp_path, {"beta": 0.04}) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, metrics(step))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"reward/mean", "kl/mean"}  # None, bools and strings are not scalars
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2, 3]
    assert [v for _, v in scalars["reward/mean"]] == pytest.approx([0.1, 0.2, 0.3])
    assert [v for _, v in scalars["kl/mean"]] == pytest.approx([0.01, 0.02, 0.03])


def test_tensorboard_resume_redoes_steps_once(tmp_path):
    with Tracker("tensorboard", tmp_path) as first:
        for step in range(1, 6):  # the run is killed after step 5; its last checkpoint was step 3
            first.log(step, metrics(step))
    with Tracker("tensorboard", tmp_path) as resumed:
        for step in range(4, 8):  # steps 4 and 5 are redone (here with other values, to tell them apart)
            resumed.log(step, metrics(step, scale=10.0))
    points = read_scalars(tmp_path / "tensorboard")["reward/mean"]
    assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6, 7]
    assert [v for _, v in points] == pytest.approx([0.1, 0.2, 0.3, 4.0, 5.0, 6.0, 7.0])


def test_from_config_and_no_tracker(tmp_path):
    tracker = Tracker.from_config(GRPOConfig(report_to=("tensorboard",)), tmp_path)
    tracker.log(1, {"reward/mean": 1.0})
    tracker.close()
    assert read_scalars(tmp_path / "tensorboard")["reward/mean"] == [(1, 1.0)]
    quiet = Tracker.from_config(GRPOConfig(), tmp_path / "other")  # report_to=(): nothing, nowhere
    quiet.log(1, {"reward/mean": 1.0})
    quiet.close()
    assert not (tmp_path / "other").exists() and normalize_report_to("none") == ()


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(TrackingError, match=r"report_to includes \"wandb\".*`pip install wandb`") as err:
        Tracker(("tensorboard", "wandb"), tmp_path)
    assert isinstance(err.value, ConfigError)  # the CLI prints it as a one-line config error
    assert not (tmp_path / "tensorboard").exists()  # checked before any tracker started
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(TrackingError, match="pip install trackio"):
        Tracker("trackio", tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrackingError, match="pip install tensorboard"):
        Tracker("tensorboard", tmp_path)


def test_bad_names_and_missing_run_dir(tmp_path):
    with pytest.raises(TrackingError, match="unknown tracker"):
        Tracker(("mlflow",), tmp_path)
    with pytest.raises(TrackingError, match="needs a run_dir"):
        Tracker(("tensorboard",), None)


def fake_trackio(calls):
    mod = types.ModuleType("trackio")
    mod.init = lambda **kw: calls.append(("init", kw))
    mod.log = lambda values, step=None: calls.append(("log", step, values))
    mod.finish = lambda: calls.append(("finish",))
    return mod


def test_trackio_gets_every_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(calls))
    with Tracker("trackio", tmp_path / "run-a", {"beta": 0.04}, project="p") as tracker:
        tracker.log(1, metrics(1))
    assert calls[0] == ("init", {"project": "p", "name": "run-a", "config": {"beta": 0.04}, "resume": "allow"})
    assert calls[1] == ("log", 1, {"reward/mean": pytest.approx(0.1), "kl/mean": pytest.approx(0.01)})
    assert calls[2] == ("finish",)


def fake_wandb(calls):
    mod = types.ModuleType("wandb")
    mod.util = types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}")

    def init(**kw):
        calls.append(("init", kw))
        return types.SimpleNamespace(log=lambda values, step=None: calls.append(("log", step)),
                                     finish=lambda: calls.append(("finish",)))

    mod.init = init
    return mod


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    with Tracker("wandb", tmp_path) as first:
        for step in (1, 2, 3):
            first.log(step, metrics(step))
    with Tracker("wandb", tmp_path) as resumed:
        for step in (2, 3, 4):  # redone steps: W&B already has 2 and 3
            resumed.log(step, metrics(step))
    inits = [kw for c, *rest in calls if c == "init" for kw in rest]
    assert inits[0]["id"] == inits[1]["id"] == json.loads((tmp_path / STATE_NAME).read_text())["wandb_id"]
    assert all(kw["resume"] == "allow" and kw["dir"] == str(tmp_path) for kw in inits)
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 4]


def test_scalar_metrics():
    values = scalar_metrics({"a": 1, "b": 2.5, "c": None, "d": True, "e": "s", "f": float("nan")})
    assert values.keys() == {"a", "b", "f"}
