"""ipywidgets over step records: the completion inspector, the reward playground, the live dashboard.

Each widget reads StepRecords (or a run log) and calls the core (rewards, advantages, plots); the core
never imports this module. Every widget keeps its controls as attributes (`inspector.step`,
`playground.sliders["format"]`) and its computed state as plain attributes, so a test drives it as a
user would and asserts the numbers. Display one by making it the last expression of a cell.

Display works on ipywidgets 7.7+ and 8.x (and in Colab, whose custom widget manager is switched on before the
first display): each widget's display bundle holds the live widget view and, as `text/html`, `to_html()`, a
static rendering of what it shows (escaped, figures as inline PNG) that nbviewer, GitHub's preview or a
frontend without the widget extension show instead.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import re
import sys

import ipywidgets as W
import torch

from .advantages import SCALES, group_advantages
from .console import TerminalDashboard, eta_text, format_duration, format_step_line  # noqa: F401 - re-exported
from .doctor import findings_html
from .plots import as_records, finite_or, plot_group_advantages, plot_training_curves
from .rewards import (
    RewardFunctionError, default_trainer_state, regex_reward, resolve_reward_funcs, reward_inputs, reward_name,
    score_completions,
)
from .runlog import StepRecord


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Colab, VS Code), where widgets render; False in a
    terminal, a script or plain IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes (for an ipywidgets.Image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_html(png: bytes) -> str:
    """An <img> with the PNG inline (base64), for static HTML."""
    return f'<img src="data:image/png;base64,{base64.b64encode(bytes(png)).decode("ascii")}">' if png else ""


def _one_line_ending(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else "..." + text[-(n - 3):]  # the end of a chat prompt is the question


def _reward_text(x, missing: str = "n/a") -> str:
    """A reward for display: 4 significant digits, `missing` for None / NaN (does not apply, unscorable)."""
    x = finite_or(x, None)
    return missing if x is None else f"{x:.4g}"


WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
_colab_manager_enabled = False


def _enable_colab_widget_manager() -> None:
    """In Colab, switch on its custom widget manager (which renders ipywidgets 8) once per kernel; a no-op
    elsewhere, and never an error where Colab lacks the call."""
    global _colab_manager_enabled
    if _colab_manager_enabled or "google.colab" not in sys.modules:
        return
    _colab_manager_enabled = True
    try:
        from google.colab import output

        output.enable_custom_widget_manager()
    except Exception:  # an older or newer Colab without it: its default widget manager stays
        pass


class _Displayable:
    """Shows `self.widget` when the object is the last expression of a notebook cell, with `to_html()` as the
    static fallback. The bundle is built here, as ipywidgets 7 (`_ipython_display_`) and 8
    (`_repr_mimebundle_`) build theirs: both use widget-view version 2.0, and 7 then calls
    `_handle_displayed()`, which runs the `on_displayed` callbacks (a Box passes it on to its children)."""

    widget: W.Widget

    def to_html(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        _enable_colab_widget_manager()
        bundle = {"text/plain": repr(self), "text/html": self.to_html()}
        if getattr(self.widget, "comm", None) is None:  # closed: only the static view is left
            return bundle
        bundle[WIDGET_VIEW_MIME] = {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id}
        if hasattr(self.widget, "_handle_displayed"):  # ipywidgets 7 only
            self.widget._handle_displayed()
        return bundle


# ----------------------------------------------------------------------------------------------
# completion inspector
# ----------------------------------------------------------------------------------------------

FILTERS = ("all", "best", "worst", "truncated")
TOKEN_QUANTITIES = (("none", ""), ("log-probability", "logp"), ("ratio to old policy", "ratio"),
                    ("KL to reference", "kl"))
RATIO_FULL_COLOUR = 0.2  # |ratio - 1| at which a token is fully coloured: the usual clip epsilon
COLOUR_LEGENDS = {
    "logp": "red: unlikely tokens (opacity 1 - p)",
    "ratio": f"blue: ratio > 1, orange: ratio < 1, full at |ratio - 1| = {RATIO_FULL_COLOUR}",
    "kl": "purple: KL to the reference, full at the largest on screen = {kl_scale:.3g}",
}


def select_completions(record: StepRecord, group: int, how: str) -> list[int]:
    """Indices (into the step's N completions) of group `group` kept by the filter `how`: all, best / worst
    (every completion with the group's highest / lowest total; unscorable ones are neither), truncated."""
    if how not in FILTERS:
        raise ValueError(f"filter {how!r}; choose one of {FILTERS}")
    idx = list(range(record.num_generations * group, record.num_generations * (group + 1)))
    if how == "truncated":
        return [i for i in idx if record.truncated[i]]
    if how in ("best", "worst"):
        totals = {i: finite_or(record.total[i], None) for i in idx}
        scored = [t for t in totals.values() if t is not None]
        target = (max if how == "best" else min)(scored) if scored else None
        return [i for i in idx if scored and totals[i] == target]
    return idx


def token_colour(quantity: str, value: float | None, kl_scale: float = 1.0) -> str:
    """CSS background of one token. logp: red with opacity 1 - p (unlikely tokens stand out);
    ratio: blue above 1, orange below, full at |ratio - 1| = 0.2; kl: purple, full at kl_scale."""
    if value is None or not math.isfinite(value):
        return "transparent"
    if quantity == "logp":
        rgb, alpha = (214, 39, 40), 1.0 - math.exp(min(value, 0.0))
    elif quantity == "ratio":
        rgb, alpha = ((31, 119, 180) if value > 1 else (255, 127, 14)), abs(value - 1.0) / RATIO_FULL_COLOUR
    else:
        rgb, alpha = (148, 103, 189), value / kl_scale
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{min(max(alpha, 0.0), 1.0):.2f})"


def _tokens_html(tokens: list[str], values: list, quantity: str, kl_scale: float) -> str:
    spans = [f'<span title="{quantity}={"n/a" if v is None else f"{v:.4g}"}" '
             f'style="background:{token_colour(quantity, v, kl_scale)}">{html.escape(t)}</span>'
             for t, v in zip(tokens, values)]
    return "".join(spans)


def _text_html(record: StepRecord, i: int, quantity: str, kl_scale: float) -> str:
    """The completion, its tokens coloured by `quantity` when the record stored it for every token."""
    values = record.token_stats.get(quantity, []) if quantity else []
    if quantity and i < len(values) and i < len(record.tokens) and len(values[i]) == len(record.tokens[i]) > 0:
        return _tokens_html(record.tokens[i], values[i], quantity, kl_scale)
    note = f'<i style="color:gray">(no per-token {quantity} stored)</i>\n' if quantity else ""
    return note + html.escape(record.completions[i])


def _card_html(record: StepRecord, i: int, quantity: str, kl_scale: float) -> str:
    """One completion: its total (or "unscorable": no function applies, advantage 0), advantage,
    per-function rewards (weighted sum = total), what reward functions logged for it, and its text."""
    j = i - record.num_generations * (i // record.num_generations)
    adv = finite_or(record.advantages[i], 0.0)
    colour = "green" if adv > 0 else "red" if adv < 0 else "gray"
    flag = ' <span style="color:#b00">truncated</span>' if record.truncated[i] else ""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>&times;{w:g}</td><td>{_reward_text(r)}</td></tr>"
                   for name, w, r in zip(record.reward_names, record.reward_weights, record.rewards[i]))
    # what reward functions logged for this completion (log_extra), e.g. the code reward's test verdicts
    rows += "".join(f'<tr><td>{html.escape(column)}</td><td colspan="2">{html.escape(str(values[i]))}</td></tr>'
                    for column, values in record.logged.items() if i < len(values) and values[i] is not None)
    return (f'<div class="grpo-card" data-index="{i}" style="flex:1 1 200px;min-width:180px;border:1px solid #ccc;'
            f'border-radius:4px;padding:6px">'
            f"<b>#{j}</b> total <b>{_reward_text(record.total[i], 'unscorable')}</b> advantage "
            f'<b style="color:{colour}">{adv:+.3f}</b> &middot; {record.lengths[i]} tokens{flag}'
            f'<table style="font-size:90%">{rows}</table>'
            f'<div style="white-space:pre-wrap;font-family:monospace;font-size:90%">'
            f"{_text_html(record, i, quantity, kl_scale)}</div></div>")


def _max_token_value(record: StepRecord, quantity: str, indices: list[int]) -> float:
    values = record.token_stats.get(quantity, [])
    return max([v for i in indices if i < len(values) for v in values[i] if v is not None] + [1e-8])


class CompletionInspector(_Displayable):
    """Pick a step and a prompt; its G completions side by side with their per-function rewards,
    total and advantage; filter to best / worst / truncated; colour tokens by logp, ratio or KL."""

    def __init__(self, run_log_or_records):
        self.records = {r.step: r for r in as_records(run_log_or_records)}
        if not self.records:
            raise ValueError("no step records to inspect; pass a run directory with a non-empty log.jsonl")
        steps = list(self.records)
        self.step = W.Dropdown(options=steps, value=steps[-1], description="step")
        self.prompt = W.Dropdown(description="prompt", layout=W.Layout(width="480px"))
        self.filter = W.ToggleButtons(options=FILTERS, value="all", description="show")
        self.colour_by = W.Dropdown(options=TOKEN_QUANTITIES, value="", description="colour by")
        self.html = W.HTML()
        self.shown: list[int] = []  # completion indices currently displayed
        self.step.observe(self._on_step, "value")
        for control in (self.prompt, self.filter, self.colour_by):
            control.observe(self._render, "value")
        self._on_step()
        self.widget = W.VBox([W.HBox([self.step, self.prompt]), W.HBox([self.filter, self.colour_by]), self.html])

    @property
    def record(self) -> StepRecord:
        return self.records[self.step.value]

    def __repr__(self) -> str:
        return f"CompletionInspector(step {self.step.value}, prompt {self.prompt.value}, {len(self.shown)} shown)"

    def _on_step(self, change=None) -> None:
        self.prompt.options = [(f"{g}: {_one_line_ending(p)}", g) for g, p in enumerate(self.record.prompts)]
        self.prompt.value = 0
        self._render()

    def _view(self, record: StepRecord, g: int, open_prompt: bool = False) -> tuple[list[int], str]:
        """The completions of prompt g that the filter keeps, and their HTML: the prompt (folded unless
        open_prompt) with its gold answer, then one card per completion."""
        quantity = self.colour_by.value
        shown = select_completions(record, g, self.filter.value)
        kl_scale = _max_token_value(record, "kl", shown)  # KL is coloured relative to the largest on screen
        gold = record.answers[g] if g < len(record.answers) else None
        legend = f" &middot; {COLOUR_LEGENDS[quantity].format(kl_scale=kl_scale)}" if quantity else ""
        head = (f"<details{' open' if open_prompt else ''}><summary>prompt"
                f"{'' if gold is None else f' (gold answer {html.escape(str(gold))})'}{legend}</summary>"
                f"<pre style='white-space:pre-wrap'>{html.escape(record.prompts[g])}</pre></details>")
        cards = "".join(_card_html(record, i, quantity, kl_scale) for i in shown) or "<i>no completion matches</i>"
        return shown, f'{head}<div style="display:flex;flex-wrap:wrap;gap:6px">{cards}</div>'

    def _render(self, change=None) -> None:
        self.shown, self.html.value = self._view(self.record, self.prompt.value)

    def to_html(self, step: int | None = None, group: int | None = None) -> str:
        """Static HTML of the view: step, prompt (unfolded) and gold answer, the cards of the completions shown.
        `step` / `group` render another step / prompt (current filter and colouring) without touching the
        controls; by default the one on screen (group 0 of another step)."""
        step = self.step.value if step is None else step
        if group is None:
            group = self.prompt.value if step == self.step.value else 0
        _, body = self._view(self.records[step], group, open_prompt=True)
        return (f'<div class="grpo-inspector"><b>step {step}</b> &middot; prompt {group} &middot; '
                f"showing {self.filter.value}{body}</div>")


# ----------------------------------------------------------------------------------------------
# reward playground
# ----------------------------------------------------------------------------------------------

REGEX_NAME = "regex"


class RewardPlayground(_Displayable):
    """Re-score a step's stored completions as you change the reward: a weight slider and an on/off
    toggle per function, plus a regex reward typed in a text box (rewards.regex_reward). Every change
    re-runs rewards.score_completions as the trainer calls it (so functions written for TRL work unchanged)
    and advantages.group_advantages; nothing is generated.

    State after each change: .scores (RewardScores), .totals [N] (NaN: unscorable), .advantages [groups, G],
    .zero_std [groups] bool, .zero_std_count, .error (None, or why the last change was not applied).
    """

    def __init__(self, records, reward_funcs, weights=None, regex: str = "", scale: str = "group"):
        self.records = {r.step: r for r in as_records(records)}
        if not self.records:
            raise ValueError("no step records to re-score; pass a run directory with a non-empty log.jsonl")
        self.funcs = {reward_name(f): f for f in resolve_reward_funcs(reward_funcs)}
        weights = [1.0] * len(self.funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.funcs):
            raise ValueError(f"{len(weights)} weights for the {len(self.funcs)} reward functions {list(self.funcs)}; "
                             f"pass one weight per function")
        steps = list(self.records)
        self.step = W.Dropdown(options=steps, value=steps[-1], description="step")
        self.scale = W.ToggleButtons(options=SCALES, value=scale, description="std over")
        self.regex = W.Text(value=regex, placeholder="regex the whole completion must match",
                            description="regex", continuous_update=False, layout=W.Layout(width="420px"))
        names = [*self.funcs, REGEX_NAME]
        self.toggles = {n: W.Checkbox(value=True, description=n, indent=False,
                                      layout=W.Layout(width="140px")) for n in names}
        low, high = min(0.0, *weights), max(3.0, *weights)  # the given weights must fit on the sliders
        self.sliders = {n: W.FloatSlider(value=w, min=low, max=high, step=0.05, description="weight",
                                         continuous_update=False) for n, w in zip(names, [*weights, 1.0])}
        self.status = W.HTML()
        self.image = W.Image(format="png")
        self.error: str | None = None
        for control in (self.step, self.scale, self.regex, *self.toggles.values(), *self.sliders.values()):
            control.observe(self.rescore, "value")
        self.rescore()
        if self.error:
            raise ValueError(self.error)
        rows = [W.HBox([self.toggles[n], self.sliders[n]] + ([self.regex] if n == REGEX_NAME else [])) for n in names]
        self.widget = W.VBox([W.HBox([self.step, self.scale]), *rows, self.status, self.image])

    @property
    def record(self) -> StepRecord:
        return self.records[self.step.value]

    def __repr__(self) -> str:
        return (f"RewardPlayground(step {self.step.value}, "
                f"{self.zero_std_count}/{len(self.zero_std)} zero-variance groups)")

    def _active(self) -> tuple[list, list[float]]:
        """The switched-on functions (the regex one built from the text box) and their weights."""
        funcs, weights = [], []
        for name, toggle in self.toggles.items():
            if toggle.value and (name != REGEX_NAME or self.regex.value):
                is_regex = name == REGEX_NAME
                funcs.append(regex_reward(self.regex.value, name=REGEX_NAME) if is_regex else self.funcs[name])
                weights.append(self.sliders[name].value)
        return funcs, weights

    def _score(self, funcs, weights):
        """score_completions called as the trainer calls it: the step's dataset rows (raw prompt, gold answer,
        other columns), completions and token ids through rewards.reward_inputs, TRL's trainer_state at the step."""
        r, G = self.record, self.record.num_generations
        inputs = reward_inputs(r.rows(), r.completions, G, r.completion_ids or None)
        return score_completions(funcs, **inputs, weights=weights, num_generations=G,
                                 trainer_state=default_trainer_state(r.step))

    def rescore(self, change=None) -> None:
        """Recompute totals, advantages and zero-variance groups from the controls, then redraw."""
        try:
            funcs, weights = self._active()
            scores = self._score(funcs, weights) if funcs else None
        except (re.error, RewardFunctionError) as e:  # keep the last good state on screen
            self.error = f"{type(e).__name__}: {e}"
            self.status.value = f'<span style="color:#b00">not applied: {html.escape(self.error)}</span>'
            return
        self.error, self.scores = None, scores
        G = self.record.num_generations
        self.totals = scores.total if scores else torch.zeros(len(self.record.completions))  # [N]
        # advantages: [groups, G], zero_std: [groups]
        self.advantages, self.zero_std = group_advantages(self.totals.view(-1, G), scale=self.scale.value)
        self.zero_std_count = int(self.zero_std.sum())
        unscorable = int(self.totals.isnan().sum())
        skipped = " (regex empty: skipped)" if self.toggles[REGEX_NAME].value and not self.regex.value else ""
        self.status.value = (f"zero-variance groups: <b>{self.zero_std_count} / {len(self.zero_std)}</b>{skipped}"
                             + (f" &middot; unscorable completions: <b>{unscorable}</b>" if unscorable else ""))
        self.image.value = figure_png(plot_group_advantages(self.rescored_record()))

    def rescored_record(self) -> StepRecord:
        """A copy of the current step's record carrying the playground's rewards, totals and advantages."""
        s = self.scores
        return dataclasses.replace(
            self.record, reward_names=s.names if s else [], reward_weights=s.weights.tolist() if s else [],
            rewards=s.as_lists() if s else [[] for _ in self.totals], total=self.totals.tolist(),
            advantages=self.advantages.flatten().tolist())

    def to_html(self) -> str:
        """Static HTML of the current state: a table of every completion's per-function scores, total and
        advantage (weights in the header), the zero-variance count and the advantage figure."""
        rec = self.rescored_record()
        head = "".join(f"<th>{html.escape(n)} &times;{w:g}</th>" for n, w in zip(rec.reward_names, rec.reward_weights))
        rows = "".join(self._row_html(rec, i) for i in range(len(rec.completions)))
        return (f'<div class="grpo-playground"><b>step {rec.step}</b> &middot; std over {self.scale.value}'
                f'<table><tr><th>group</th><th>#</th><th>completion</th>{head}<th>total</th><th>advantage</th></tr>'
                f"{rows}</table><p>{self.status.value}</p>{png_html(self.image.value)}</div>")

    @staticmethod
    def _row_html(rec: StepRecord, i: int) -> str:
        g, j = divmod(i, rec.num_generations)
        scores = "".join(f"<td>{_reward_text(r)}</td>" for r in rec.rewards[i])
        return (f"<tr><td>{g}</td><td>{j}</td><td><code>{html.escape(_one_line_ending(rec.completions[i]))}</code></td>"
                f"{scores}<td>{_reward_text(rec.total[i], 'unscorable')}</td><td>{rec.advantages[i]:+.3f}</td></tr>")


# ----------------------------------------------------------------------------------------------
# live training dashboard
# ----------------------------------------------------------------------------------------------

class TrainingDashboard(TerminalDashboard, _Displayable):
    """Live view of a run: `trainer.train(on_step=dashboard.update)`. In a notebook a progress bar, the latest
    step's line and plot_training_curves redrawn in place (every `plot_every` steps), and the run doctor's
    findings under the curves (and in to_html()); in a terminal (notebook=False, or outside a Jupyter kernel)
    it is console.TerminalDashboard: a tqdm bar, one line per step, a line per new alarm. The step line, the
    ETA and the doctor's rhythm (every `doctor_every` steps and at the last) are the terminal's. When the
    dashboard displayed itself (created and trained in one cell), the last step refreshes that display, so a
    saved notebook's static fallback shows the finished run."""

    def __init__(self, total_steps: int, plot_every: int = 1, notebook: bool | None = None,
                 eval_seconds: float | None = None, config=None, doctor_every: int = 5):
        self.notebook = in_notebook() if notebook is None else notebook
        self.plot_every = plot_every
        self._displayed, self._handle = False, None
        super().__init__(total_steps, eval_seconds=eval_seconds, config=config, doctor_every=doctor_every)
        if self.notebook:
            self.progress = W.IntProgress(value=0, min=0, max=total_steps, description="step")
            self.line = W.HTML()
            self.image = W.Image(format="png")
            self.doctor = W.HTML()
            self.widget = W.VBox([W.HBox([self.progress, self.line]), self.image, self.doctor])

    def _make_bar(self):
        return None if self.notebook else super()._make_bar()

    def _repr_mimebundle_(self, **kwargs):
        if not self.notebook:
            return None  # the terminal view is the tqdm bar
        self._displayed = True
        return super()._repr_mimebundle_(**kwargs)

    def to_html(self) -> str:
        """Static HTML: the latest step line (with the ETA), the training curves as an inline PNG and the run
        doctor's findings on the steps so far."""
        if not self.records:
            return f"<p>training: 0/{self.total_steps} steps done</p>"
        png = figure_png(plot_training_curves(self.records), dpi=70)
        doctor = findings_html(self._diagnose()) if self.doctor_every else ""
        return (f'<div class="grpo-dashboard"><code>{html.escape(repr(self))}</code><br>{png_html(png)}'
                f"{doctor}</div>")

    def update(self, record: StepRecord) -> None:
        """Show one finished step (the trainer's on_step callback)."""
        if not self.notebook:
            return super().update(record)
        line, doctor_due = self._add(record)
        if doctor_due:
            self.run_doctor()  # before the redraw, so the last step's static view has the final findings
        self._show_in_notebook(record, line)

    def _show_in_notebook(self, record: StepRecord, line: str) -> None:
        if not self._displayed:  # created and trained in one cell: show it on the first step
            from IPython.display import display

            self._handle = display(self, display_id=True)
            self._displayed = True
        self.progress.value = min(record.step, self.total_steps)
        self.line.value = f"<code>{html.escape(line)}</code>"
        last = record.step >= self.total_steps
        if len(self.records) % self.plot_every == 0 or last:
            self.image.value = figure_png(plot_training_curves(self.records), dpi=70)
        if last and self._handle is not None:  # the static fallback a saved notebook keeps: the finished run
            self._handle.update(self)

    def run_doctor(self) -> list:
        """Re-diagnose the steps seen so far; show the findings (notebook) or print new warnings (terminal)."""
        if not self.notebook:
            return super().run_doctor()
        self.findings = self._diagnose()
        self.doctor.value = findings_html(self.findings)
        return self.findings

    def close(self) -> None:
        """Close the terminal progress bar (nothing to do in a notebook)."""
        if not self.notebook:
            super().close()
