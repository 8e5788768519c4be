"""The live training view in a terminal: a tqdm bar, one line per step with an ETA, the run doctor's new alarms.

    dashboard = TerminalDashboard(config.max_steps, eval_seconds=..., config=config.to_dict())
    trainer.train(on_step=dashboard.update)
    dashboard.close()

What `python -m grpo_lib train` shows. It needs no notebook packages (ipywidgets, IPython): widgets.
TrainingDashboard, the notebook's view, builds on this class and shares its step line, ETA and doctor rhythm.
"""

from __future__ import annotations

import statistics
import warnings

from .doctor import LABELS, diagnose
from .runlog import StepRecord

STEP_LINE_METRICS = (("reward/mean", "reward"), ("reward/std", "std"), ("adv/zero_std_frac", "zero-var"),
                     ("kl/mean", "kl"), ("completion/mean_length", "len"), ("loss", "loss"),
                     ("time/step_s", "s/step"))


def format_step_line(record: StepRecord, total_steps: int, eta: str = "") -> str:
    """'step 3/30  reward 0.5  std 0.31  ...' with the metrics the record has, then `eta` if given."""
    parts = [f"step {record.step}/{total_steps}"]
    parts += [f"{label} {record.metrics[key]:.4g}" for key, label in STEP_LINE_METRICS
              if record.metrics.get(key) is not None]
    return "  ".join(parts + ([eta] if eta else []))


def format_duration(seconds: float) -> str:
    """45 s, 12 min, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def eta_text(step_times: list[float], steps_left: int, eval_seconds: float | None = None) -> str:
    """'ETA 12 min + ~1 min final evaluation': steps_left times the median measured step time (robust to a
    slow first step), plus the final evaluation's expected duration if given; "" before any measured step.
    After the last step: 'training done, final evaluation ~1 min' (what is left is no longer training)."""
    if not step_times:
        return ""
    if steps_left <= 0:
        return f"training done, final evaluation ~{format_duration(eval_seconds)}" if eval_seconds else ""
    parts = [format_duration(statistics.median(step_times) * steps_left)]
    parts += [f"~{format_duration(eval_seconds)} final evaluation"] if eval_seconds else []
    return "ETA " + " + ".join(parts) if parts else ""


class TerminalDashboard:
    """Live view of a run in a terminal: `trainer.train(on_step=dashboard.update)`. A tqdm bar and one printed
    line per step; from the first step on, the line ends with an ETA from the measured step times
    (metrics["time/step_s"]) plus `eval_seconds`, the expected duration of a final evaluation if the caller
    gives it, and the ETA is also printed once on its own. record.step counts completed steps, so a resumed
    run's progress starts where it resumed.

    Every `doctor_every` steps (and at the last) the run doctor (grpo_lib.doctor.diagnose, with `config` for
    num_iterations, beta, ...) re-reads the steps seen so far and one line is printed for each new warning or
    problem."""

    def __init__(self, total_steps: int, eval_seconds: float | None = None, config=None, doctor_every: int = 5):
        self.total_steps, self.eval_seconds = total_steps, eval_seconds
        self.config, self.doctor_every = config, doctor_every
        self.findings: list = []  # the run doctor's latest findings (grpo_lib.doctor.Finding)
        self._reported: set = set()  # (check, title) of the findings printed
        self.records: list[StepRecord] = []
        self.eta = ""  # the latest estimate of the time left
        self._eta_printed = False
        self.bar = self._make_bar()

    def _make_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.total_steps, unit="step")

    def __repr__(self) -> str:
        if not self.records:
            return f"{type(self).__name__}(0/{self.total_steps} steps)"
        return format_step_line(self.records[-1], self.total_steps, self.eta)

    def step_times(self) -> list[float]:
        """The measured durations (s) of the steps seen so far."""
        return [r.metrics["time/step_s"] for r in self.records if r.metrics.get("time/step_s") is not None]

    def _add(self, record: StepRecord) -> tuple[str, bool]:
        """Keep one finished step: (its step line with the ETA, whether the doctor is due)."""
        self.records.append(record)
        self.eta = eta_text(self.step_times(), self.total_steps - record.step, self.eval_seconds)
        doctor_due = bool(self.doctor_every) and (len(self.records) % self.doctor_every == 0
                                                  or record.step >= self.total_steps)
        return format_step_line(record, self.total_steps, self.eta), doctor_due

    def update(self, record: StepRecord) -> None:
        """Show one finished step (the trainer's on_step callback)."""
        line, doctor_due = self._add(record)
        self.bar.update(min(record.step, self.total_steps) - self.bar.n)
        if self.eta and not self._eta_printed:
            self.bar.write(f"{self.eta} for the {self.total_steps - record.step} remaining steps")
            self._eta_printed = True
        self.bar.write(line)
        if doctor_due:
            self.run_doctor()  # after the step line: its new alarms, one line each

    def _diagnose(self) -> list:
        """The doctor's findings on the steps seen so far; if it fails, a warning and the last findings (a view
        never stops the training)."""
        try:
            return diagnose(self.records, self.config)
        except Exception as e:  # noqa: BLE001 - a bug in the doctor must not end a run
            warnings.warn(f"run doctor failed ({type(e).__name__}: {e}); training goes on", stacklevel=3)
            return self.findings

    def run_doctor(self) -> list:
        """Re-diagnose the steps seen so far and print each new warning or problem on one line."""
        self.findings = self._diagnose()
        for f in self.findings:
            if f.severity != "info" and (f.check, f.title) not in self._reported:
                self._reported.add((f.check, f.title))
                self.bar.write(f"doctor: [{LABELS[f.severity]}] {f.title} ({f.evidence})")
        return self.findings

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()
