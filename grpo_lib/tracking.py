"""Experiment tracking: each step's metrics also sent to TensorBoard, Trackio or Weights & Biases (`report_to`).

    tracker = Tracker(config.report_to, run_dir, config.to_dict())   # or Tracker.from_config(config, run_dir)
    tracker.log(record.step, record.metrics)                          # after the step is in log.jsonl
    tracker.close()

`report_to` is TRL's name for the same knob: a tuple of "tensorboard", "trackio", "wandb" (or a single name;
"none" or () sends nothing). The run log (run_dir/log.jsonl) stays the source of truth; the trackers are
views of it. Every tracker asked for must be importable: a missing package is a TrackingError naming the pip
command, raised when the Tracker is created, before anything is written (never a silent skip).

    tensorboard  torch.utils.tensorboard.SummaryWriter under run_dir/tensorboard, flushed after every step.
                 Resume-safe: when the directory already holds event files, the writer is opened with
                 purge_step = the first step this session logs, so TensorBoard discards the earlier
                 session's points at that step and after (the steps a resume redoes), and each step shows once.
    trackio      trackio.init(project, name=<run dir name>, config, resume="allow"), trackio.log(metrics, step),
                 into trackio's local store ($TRACKIO_DIR, by default ~/.cache/huggingface/trackio; no network).
    wandb        wandb.init(project, name, config, dir=run_dir, id=<kept in run_dir/tracking.json>,
                 resume="allow"): a resumed run continues the same W&B run. WANDB_MODE=offline writes the run
                 under run_dir/wandb for a later `wandb sync`, with no network.
    trackio and W&B keep every point they are sent (W&B online refuses a step it has), so the last step sent
    is kept in run_dir/tracking.json and a resume's redone steps are not sent again (they run on the
    checkpoint's RNG state, so the values the trackers kept are the ones the log has).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import uuid
from pathlib import Path

from .config import TRACKERS, ConfigError, tracker_names

TENSORBOARD_DIR = "tensorboard"
SENT_STEPS_FILE = "tracking.json"  # run_dir file: the W&B run id, the last step each tracker has
DEFAULT_PROJECT = "grpo_lib"
INSTALL = {"tensorboard": "pip install tensorboard", "trackio": "pip install trackio", "wandb": "pip install wandb"}
MODULES = {"tensorboard": "torch.utils.tensorboard", "trackio": "trackio", "wandb": "wandb"}


class TrackingError(ConfigError):
    """A tracker in report_to cannot be used; the message says which and how to fix it."""


def normalize_report_to(report_to) -> tuple[str, ...]:
    """None, "none", "tensorboard", ("tensorboard", "wandb") -> a tuple of tracker names, checked."""
    names = tracker_names(report_to)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackingError(f"report_to={names!r}: unknown tracker(s) {unknown}; choose from {TRACKERS}")
    return tuple(dict.fromkeys(names))  # in order, once each


def require(name: str):
    """Import the module a tracker needs, or raise TrackingError with the pip command."""
    try:
        return importlib.import_module(MODULES[name])
    except ImportError as e:
        raise TrackingError(f'report_to includes "{name}" but {MODULES[name]} cannot be imported ({e}); install '
                            f'it with `{INSTALL[name]}`, or remove "{name}" from report_to') from e


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a step's metrics (bools and non-numbers left out; None, how the log stores NaN, too)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Sends step metrics to every tracker in report_to. Use as a context manager or call close()."""

    def __init__(self, report_to=(), run_dir: str | os.PathLike | None = None, config: dict | None = None,
                 project: str | None = None, run_name: str | None = None):
        self.report_to = normalize_report_to(report_to)
        modules = {name: require(name) for name in self.report_to}  # all checked before anything starts
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is None and self.report_to:
            raise TrackingError(f"report_to={self.report_to} needs a run_dir (the trackers write next to the run log)")
        self.config = dict(config or {})
        self.project = project or os.environ.get("GRPO_LIB_PROJECT", DEFAULT_PROJECT)
        self.run_name = run_name or (self.run_dir.resolve().name if self.run_dir else None)
        backends = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _WandB}
        self.backends = [backends[name](modules[name], self) for name in self.report_to]

    @classmethod
    def from_config(cls, config, run_dir) -> "Tracker":
        """A Tracker for a GRPOConfig's report_to."""
        return cls(config.report_to, run_dir, config.to_dict())

    def log(self, step: int, metrics: dict) -> None:
        """Send one step's metrics (the StepRecord's flat "/"-separated dict) to every tracker."""
        values = scalar_metrics(metrics)
        for backend in self.backends:
            backend.log(int(step), values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tracker({list(self.report_to)}, run_dir={str(self.run_dir) if self.run_dir else None})"


class _TensorBoard:
    def __init__(self, module, tracker: Tracker):
        self.module, self.config = module, tracker.config
        self.log_dir = tracker.run_dir / TENSORBOARD_DIR
        self.writer = None

    def _open(self, first_step: int) -> None:
        resumed = any(self.log_dir.glob("events.out.tfevents.*"))
        # purge_step: TensorBoard drops the earlier sessions' points at steps >= first_step (the redone steps)
        self.writer = self.module.SummaryWriter(str(self.log_dir), purge_step=first_step if resumed else None)
        if self.config and not resumed:
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=1, sort_keys=True) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            self._open(step)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # the live view is current, and a killed run keeps its points

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _SentSteps:
    """The last step a tracker keeps, in run_dir/tracking.json under `key`: trackio and W&B store every point
    they are sent (W&B online refuses a step it has), so a resume's redone steps are not sent again. The
    redone steps run on the checkpoint's RNG state, so the values the tracker kept are the ones the log has."""

    def __init__(self, path: Path, key: str, same_run: bool):
        self.path, self.key = path, key
        self.last = _read_state(path).get(key, -math.inf) if same_run else -math.inf

    def is_new(self, step: int) -> bool:
        return step > self.last

    def sent(self, step: int) -> None:
        self.last = step
        _write_state(self.path, {**_read_state(self.path), self.key: step})


class _Trackio:
    def __init__(self, module, tracker: Tracker):
        self.module = module
        state_path = tracker.run_dir / SENT_STEPS_FILE
        run = f"{tracker.project}/{tracker.run_name}"  # trackio names a run by project and name
        self.steps = _SentSteps(state_path, "trackio_last_step", _read_state(state_path).get("trackio_run") == run)
        tracker.run_dir.mkdir(parents=True, exist_ok=True)
        _write_state(state_path, {**_read_state(state_path), "trackio_run": run})
        module.init(project=tracker.project, name=tracker.run_name, config=tracker.config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.steps.is_new(step):
            self.module.log(values, step=step)
            self.steps.sent(step)

    def close(self) -> None:
        self.module.finish()


class _WandB:
    def __init__(self, module, tracker: Tracker):
        state_path = tracker.run_dir / SENT_STEPS_FILE
        state = _read_state(state_path)
        run_id = state.get("wandb_id") or uuid.uuid4().hex[:8]  # W&B ids: lowercase letters and digits
        self.steps = _SentSteps(state_path, "wandb_last_step", "wandb_id" in state)
        tracker.run_dir.mkdir(parents=True, exist_ok=True)
        _write_state(state_path, {**state, "wandb_id": run_id})
        _wait_for_a_new_wandb_second(tracker.run_dir / "wandb", run_id)
        self.run = module.init(project=tracker.project, name=tracker.run_name, config=tracker.config,
                               dir=str(tracker.run_dir), id=run_id, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.steps.is_new(step):
            self.run.log(values, step=step)
            self.steps.sent(step)

    def close(self) -> None:
        self.run.finish()


def _wait_for_a_new_wandb_second(wandb_dir: Path, run_id: str) -> None:
    """W&B names a session's directory <mode>-run-<local YYYYmmdd_HHMMSS>-<id>: a resume that starts within
    the second the last session started would reuse that directory and overwrite its run file, losing the
    last session's points. Waits (at most about a second) until the name is new."""
    while any(wandb_dir.glob(f"*run-{time.strftime('%Y%m%d_%H%M%S', time.localtime())}-{run_id}")):
        time.sleep(1.01 - time.time() % 1.0)


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
