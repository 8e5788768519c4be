"""report_to: TensorBoard event files read back with TensorBoard's own reader, trackio's local store and W&B's
offline run files read back from disk (a resumed run's redone steps show once in each), and a missing package
is a clear error. trackio and W&B run for real, with no network."""

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_lib.config import ConfigError, GRPOConfig
from grpo_lib.tracking import SENT_STEPS_FILE, Tracker, TrackingError, normalize_report_to, scalar_metrics


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


def run_sessions(tmp_path, report_to: str, env: dict) -> None:
    """Two sessions of one run in a fresh interpreter (trackio reads $TRACKIO_DIR when imported): steps 1-5,
    then a resume from a step-3 checkpoint that redoes steps 4 and 5 (with other values, to tell them apart)
    and goes on to 7."""
    code = f"""if True:
        from grpo_lib.tracking import Tracker
        for steps, scale in ((range(1, 6), 1.0), (range(4, 8), 10.0)):
            with Tracker({report_to!r}, {str(tmp_path / "run-a")!r}, {{"beta": 0.04}}, project="p") as tracker:
                for step in steps:
                    tracker.log(step, {{"reward/mean": 0.1 * step * scale, "kl/mean": 0.01 * step, "loss": None,
                                        "flag": True}})
    """
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    out = subprocess.run([sys.executable, "-c", code], env={**keep, "HF_HUB_OFFLINE": "1", **env},
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# steps 4 and 5 as the first session sent them; the resume's copies are not sent again
EXPECTED = [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 0.5), (6, 6.0), (7, 7.0)]


def test_trackio_local_store_has_each_step_once(tmp_path):
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    run_sessions(tmp_path, "trackio", {"TRACKIO_DIR": str(store)})
    db = store / "p.db"  # trackio's local store: one SQLite file per project, read here without trackio
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT run_name, run_id, step, metrics FROM metrics ORDER BY id").fetchall()
        configs = con.execute("SELECT run_name, config FROM configs").fetchall()
    assert {(name, run_id) for name, run_id, _, _ in rows} == {("run-a", rows[0][1])}  # both sessions: one run
    assert [(name, json.loads(config)["beta"]) for name, config in configs] == [("run-a", 0.04)]
    logged = [(step, json.loads(values)) for _, _, step, values in rows]
    assert [(step, values["reward/mean"]) for step, values in logged] == [(s, pytest.approx(v)) for s, v in EXPECTED]
    assert [values["kl/mean"] for _, values in logged] == pytest.approx([0.01 * s for s, _ in EXPECTED])
    assert all(set(values) >= {"reward/mean", "kl/mean"} and "loss" not in values and "flag" not in values
               for _, values in logged)  # None and bools are not sent
    assert json.loads((tmp_path / "run-a" / SENT_STEPS_FILE).read_text())["trackio_last_step"] == 7


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (run-ID.wandb): a 7-byte header (":W&B", magic, version), then
    LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type
    FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4); a block's last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_resume_continues_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run-a"
    run_sessions(tmp_path, "wandb", {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                                     "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_CACHE_DIR": str(tmp_path)})
    run_id = json.loads((run_dir / SENT_STEPS_FILE).read_text())["wandb_id"]
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one file per session, both under the id kept in tracking.json
    runs, history = [], []
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
            elif kind == "history":
                history.append((record.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                          for i in record.history.item}))  # "a/b": nested_key
    assert [(r.run_id, r.project, r.display_name) for r in runs] == [(run_id, "p", "run-a")] * 2
    assert all(json.loads(next(u.value_json for u in r.config.update if u.key == "beta")) == 0.04 for r in runs)
    assert [(step, values["reward/mean"]) for step, values in history] == [(s, pytest.approx(v)) for s, v in EXPECTED]
    assert [values["kl/mean"] for _, values in history] == pytest.approx([0.01 * s for s, _ in EXPECTED])
    assert not any("loss" in values or "flag" in values for _, values in history)


def test_report_to_none_is_no_tracker():
    """TRL's "none" (a string or a one-item list) means no tracker, in GRPOConfig and through the TRL bridge."""
    for none in ("none", ["none"], (), None):
        assert GRPOConfig(report_to=none).report_to == () and normalize_report_to(none) == ()
    assert GRPOConfig(report_to="wandb").report_to == ("wandb",)
    with pytest.raises(ConfigError, match=r"report_to=\('none', 'wandb'\) is invalid"):
        GRPOConfig(report_to=("none", "wandb"))  # "none" and a tracker: which one was meant?
    pytest.importorskip("trl")
    from grpo_lib import trl_bridge

    trl_args = trl_bridge.to_trl_config(GRPOConfig(report_to="none"), "out")
    assert trl_args.report_to == []  # TRL reads "none" as no integration
    assert trl_bridge.from_trl_config(trl_args).report_to == ()
    trl_args = trl_bridge.to_trl_config(GRPOConfig(report_to=("tensorboard",)), "out")
    assert trl_bridge.from_trl_config(trl_args).report_to == ("tensorboard",)


def test_scalar_metrics():
    values = scalar_metrics({"a": 1, "b": 2.5, "c": None, "d": True, "e": "s", "f": float("nan")})
    assert values.keys() == {"a", "b", "f"}
