"""Reward functions and the rule that combines them.

A reward function is called exactly as TRL's GRPOTrainer calls it, with keyword arguments only:

    fn(prompts=, completions=, completion_ids=, **columns, trainer_state=, log_extra=, log_metric=)
        -> list[float | None]

one value per completion. `prompts` [N] is the dataset's prompt of each completion (chat messages or
text); `completions` [N] is each completion's text, or, when the prompts are chat messages (a
"conversational" dataset), a one-message list [{"role": "assistant", "content": text}];
`completion_ids` [N] its token ids; `columns` the dataset's other columns, each repeated per completion
(e.g. `answer`); `trainer_state` has TRL's `global_step` and `max_steps`; `log_extra(column, values)`
and `log_metric(name, value)` let a function log what it saw. So any function from TRL's docs,
`trl.rewards` or a tutorial (`def f(completions, **kwargs)`) runs unchanged here, and ours run in TRL.
`None` means "does not apply" (e.g. no gold answer) and is *not* a zero.

A function may declare what its values mean, as attributes (as `required_columns` declares the columns it reads):
`reward_range = (low, high)`, the values it normally takes, and `reward_kind`, one of REWARD_KINDS:
"correctness" (is the answer right), "format" (is it written the expected way), "other" (shaping: length,
consistency, penalties). The trainer records them in the run log and the run doctor reads them there (a group
whose correctness rewards are all at the top is saturated, a format reward that rises while correctness stays
flat is learned instead of the task); an undeclared function gets a guess from its name.

Combining F functions with weights w:  total_i = sum_f w_f * r_{i,f}  over the f whose r_{i,f} applies;
a completion to which no function applies is *unscorable*: its total is NaN (see advantages.py).
"""

from __future__ import annotations

import inspect
import math
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import verify
from .answers import completion_text, extract_tagged_answer, numbers_equal, parse_number


class RewardFunctionError(ValueError):
    """A reward function misbehaved; the message names the function and the sample."""


class RewardWarning(UserWarning):
    pass


class RewardTimeout(BaseException):
    """reward_timeout_s ran out inside a reward function (raised there by SIGALRM, see _call_with_timeout).

    A BaseException, like KeyboardInterrupt, for one reason: the code it interrupts (a user's reward function,
    verify, the sandbox's client) guards its own failures with `except Exception`, which must not swallow the
    trainer's deadline. So no module needs to know about it: `except Exception` lets it through, `finally`
    blocks still clean up (the sandbox kills the job's processes), and only score_completions catches it. A
    TimeoutError the function raises itself (a socket, a subprocess) stays that function's own failure."""


# ----------------------------------------------------------------------------------------------
# the reward library
# ----------------------------------------------------------------------------------------------


def regex_reward(pattern: str, name: str | None = None, flags: int = re.DOTALL, value: float = 1.0):
    """A format reward: `value` if the whole completion matches `pattern` (re.fullmatch), else 0."""
    compiled = re.compile(pattern, flags)

    def reward(completions, **kwargs):
        return [value if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    reward.__name__ = name or f"regex_reward({pattern!r})"
    reward.pattern = pattern
    reward.reward_kind = "format"
    if value:
        reward.reward_range = (min(0.0, value), max(0.0, value))
    return reward


# strict: the completion is (optional reasoning) then exactly one <answer>NUMBER</answer> and nothing after
STRICT_FORMAT = r"(?:<think>.*?</think>\s*)?[^<]*<answer>\s*-?[\d,]*\.?\d+\s*</answer>"
format_reward = regex_reward(STRICT_FORMAT, name="format")


def answer_reward(completions, answer=None, **kwargs):
    """1.0 if the number in <answer>...</answer> equals the gold `answer` column, else 0.0.
    Tolerant of '1,000', '$5', '7.0'. None where the row has no gold answer."""
    if answer is None:
        return [None] * len(completions)
    out = []
    for c, gold in zip(completions, answer):
        gold_value = parse_number(gold)
        if gold_value is None:
            out.append(None)
            continue
        pred = parse_number(extract_tagged_answer(completion_text(c)))
        out.append(1.0 if numbers_equal(pred, gold_value) else 0.0)
    return out


answer_reward.__name__ = "answer"
answer_reward.required_columns = ("answer",)  # the dataset columns it reads, checked by the trainer
answer_reward.reward_range, answer_reward.reward_kind = (0.0, 1.0), "correctness"


def xml_count_reward(completions, **kwargs):
    """Partial credit for the tag structure <think>..</think><answer>..</answer> (0.125 per tag used once),
    minus 0.001 per character after </answer>: a dense signal before the strict format is learned."""
    out = []
    for c in completions:
        t = completion_text(c)
        score = sum(0.125 for tag in ("<think>", "</think>", "<answer>", "</answer>") if t.count(tag) == 1)
        if t.count("</answer>") == 1:
            score -= 0.001 * len(t.split("</answer>")[-1].strip())
        out.append(score)
    return out


xml_count_reward.__name__ = "xml_count"
# 0.5 with every tag once; text after </answer> can take it below 0, which the doctor sees in the log
xml_count_reward.reward_range, xml_count_reward.reward_kind = (0.0, 0.5), "format"


def length_reward(max_chars: int = 200, name: str = "length"):
    """1.0 for completions up to `max_chars` characters, decaying linearly to 0 at twice that."""

    def reward(completions, **kwargs):
        return [max(0.0, min(1.0, 2.0 - len(completion_text(c)) / max_chars)) for c in completions]

    reward.__name__ = name
    reward.reward_range, reward.reward_kind = (0.0, 1.0), "other"
    return reward


def soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int,
                             name: str = "soft_overlong_punishment_reward"):
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13) on the completion's token count
    |y| (EOS included), with L_max = max_completion_len and L_cache = soft_punish_cache:

        R(y) = 0                                  |y| <= L_max - L_cache
               ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
               -1                                 L_max < |y|

    It penalises overlong completions and never rewards short ones. The same values as TRL's
    trl.rewards.get_soft_overlong_punishment, and the same name in the logs. Reads `completion_ids`."""
    if not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(f"soft_punish_cache={soft_punish_cache} must be in [0, max_completion_len="
                         f"{max_completion_len}] (DAPO: 4096 of 20480)")
    free = max_completion_len - soft_punish_cache  # longest length without a penalty

    def reward(completion_ids=None, **kwargs):
        if completion_ids is None:
            raise ValueError(f"{name} reads completion_ids (the completions' token ids), which the trainer passes")
        return [0.0 if len(ids) <= free else (free - len(ids)) / soft_punish_cache
                if len(ids) <= max_completion_len else -1.0 for ids in completion_ids]

    reward.__name__ = name
    reward.reward_range, reward.reward_kind = (-1.0, 0.0), "other"
    return reward


_LARGER_CLAIM = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s+is\s+(?:larger|bigger|greater)\s+than\s+(-?\d[\d,]*(?:\.\d+)?)",
                           re.IGNORECASE)


def consistency_reward(completions, **kwargs):
    """For "Which is larger?" answers: 1.0 if every claim "X is larger than Y" in the text is true and the
    tagged answer is the X claimed, 0.0 if a claim is false or disagrees with the tag, None without a claim
    or a tag. `answer` checks the tagged number only, so "40 is larger than 50. <answer>50</answer>" gets
    full marks there; this function measures whether the reasoning supports the answer."""
    out = []
    for c in completions:
        text = completion_text(c)
        claims = [(parse_number(a), parse_number(b)) for a, b in _LARGER_CLAIM.findall(text)]
        tagged = parse_number(extract_tagged_answer(text))
        if not claims or tagged is None:
            out.append(None)
            continue
        out.append(1.0 if all(a is not None and b is not None and a > b and numbers_equal(tagged, a)
                              for a, b in claims) else 0.0)
    return out


consistency_reward.__name__ = "consistency"
# whether the reasoning supports the tagged answer, not whether the answer is right: not "correctness"
consistency_reward.reward_range, consistency_reward.reward_kind = (0.0, 1.0), "other"


REWARD_FUNCS = {
    "format": format_reward,
    "answer": answer_reward,
    "consistency": consistency_reward,
    "xml_count": xml_count_reward,
    "length": length_reward(),
    "math_equal": verify.math_answer_reward,
    "code_tests": verify.code_tests_reward,
    "code_syntax": verify.code_syntax_reward,
}


def resolve_reward_funcs(funcs) -> list:
    """Names (from REWARD_FUNCS) or callables -> callables."""
    out = []
    for f in funcs:
        if callable(f):
            out.append(f)
        elif f in REWARD_FUNCS:
            out.append(REWARD_FUNCS[f])
        else:
            raise ValueError(f"unknown reward function {f!r}; known: {sorted(REWARD_FUNCS)} (or pass a callable)")
    return out


def required_columns(funcs) -> tuple[str, ...]:
    """Dataset columns the reward functions declare they read (attribute `required_columns`)."""
    return tuple(sorted({c for f in funcs for c in getattr(f, "required_columns", ())}))


def reward_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


REWARD_KINDS = ("correctness", "format", "other")


def reward_declaration(fn) -> tuple[list[float] | None, str | None]:
    """([low, high], kind) a reward function declares (attributes `reward_range`, `reward_kind`); None for
    what it does not declare. A malformed declaration is an error naming the function and the fix."""
    name, span, kind = reward_name(fn), getattr(fn, "reward_range", None), getattr(fn, "reward_kind", None)
    if span is not None:
        try:
            low, high = (float(v) for v in span)
        except (TypeError, ValueError):
            low = high = float("nan")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise RewardFunctionError(f"reward function {name!r} declares reward_range={span!r}; it must be a pair "
                                      f"of finite numbers (low, high) with low < high, e.g. (0.0, 1.0)")
        span = [low, high]
    if kind is not None and kind not in REWARD_KINDS:
        raise RewardFunctionError(f"reward function {name!r} declares reward_kind={kind!r}; it must be one of "
                                  f"{REWARD_KINDS}")
    return span, kind


# ----------------------------------------------------------------------------------------------
# scoring: call every function, check what it returns, combine with weights
# ----------------------------------------------------------------------------------------------


def is_conversational(prompt) -> bool:
    """A prompt given as chat messages [{"role": ..., "content": ...}] (TRL's conversational format)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def reward_inputs(rows: list[dict], completions: list[str], num_generations: int,
                  completion_ids: list[list[int]] | None = None) -> dict:
    """The arguments TRL gives reward functions, for G completions per dataset row, group-major.

    rows: [groups] dataset rows ("prompt" and other columns); completions: [N = groups * G] texts;
    completion_ids: [N] token-id lists (EOS included). Returns the keyword arguments of score_completions:
    {"prompts": [N], "completions": [N] (chat messages when the prompts are), "completion_ids": [N] | None,
    "columns": {column: [N]}}, every row's values repeated G times.
    """
    G = num_generations
    if len(completions) != len(rows) * G:
        raise ValueError(f"{len(completions)} completions for {len(rows)} rows x G={G}; expected {len(rows) * G}")
    chat = bool(rows) and is_conversational(rows[0]["prompt"])
    columns = {k: [row.get(k) for row in rows for _ in range(G)] for k in rows[0] if k != "prompt"} if rows else {}
    return {"prompts": [row["prompt"] for row in rows for _ in range(G)],
            "completions": [[{"role": "assistant", "content": c}] for c in completions] if chat else list(completions),
            "completion_ids": completion_ids, "columns": columns}


@dataclass
class RewardScores:
    names: list[str]  # [F]
    per_func: torch.Tensor  # [N, F] float, NaN where a function does not apply
    weights: torch.Tensor  # [F]
    total: torch.Tensor  # [N] = nansum_f w_f * per_func[:, f]; NaN where no function applies (unscorable)
    logged_metrics: dict = field(default_factory=dict)  # name -> mean of what functions passed to log_metric
    logged_columns: dict = field(default_factory=dict)  # column -> [N] values passed to log_extra
    ranges: list = field(default_factory=list)  # [F] each function's declared [low, high], or None
    kinds: list = field(default_factory=list)  # [F] each function's declared kind (REWARD_KINDS), or None

    def as_lists(self) -> list[list[float | None]]:
        """[N][F] with None for "does not apply" (how StepRecord stores it)."""
        return [[None if math.isnan(v) else v for v in row] for row in self.per_func.tolist()]

    @property
    def unscorable(self) -> torch.Tensor:
        """[N] bool: no reward function applies to the completion."""
        return self.per_func.isnan().all(dim=1)

    @staticmethod
    def cat(parts: list[tuple["RewardScores", list[int]]]) -> "RewardScores":
        """The rows `rows` of each RewardScores, in order, as one: parts [(scores, its rows)] (same functions).
        Logged metrics are averaged over the parts, logged columns kept for the rows taken."""
        first = parts[0][0]
        metrics = {k: sum(s.logged_metrics[k] for s, _ in parts if k in s.logged_metrics) /
                      sum(k in s.logged_metrics for s, _ in parts) for s, _ in parts for k in s.logged_metrics}
        columns = {k: [v for s, rows in parts for v in ([s.logged_columns[k][i] for i in rows]
                                                        if k in s.logged_columns else [None] * len(rows))]
                   for s, _ in parts for k in s.logged_columns}
        return RewardScores(first.names, torch.cat([s.per_func[rows] for s, rows in parts]), first.weights,
                            torch.cat([s.total[rows] for s, rows in parts]), metrics, columns, first.ranges,
                            first.kinds)


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """total_i = sum_f w_f r_{i,f} over the functions that apply (NaN = does not apply); NaN where none
    applies, since an unscorable completion is not one that scored 0.  [N, F] -> [N]"""
    total = torch.nansum(per_func * weights[None, :], dim=1)
    return total.masked_fill(per_func.isnan().all(dim=1), float("nan"))


def _elide_middle(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]


def _call_with_timeout(fn, timeout_s: float, kwargs: dict):
    """Call fn(**kwargs); raise RewardTimeout after timeout_s. In the main thread on POSIX SIGALRM interrupts
    the call itself; elsewhere the call runs in a daemon thread that is abandoned (it cannot be killed)."""
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        def on_alarm(signum, frame):
            raise RewardTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(**kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(**kwargs)
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise RewardTimeout
    if "error" in result:
        raise result["error"]
    return result["value"]


def _checked_values(name: str, values, completions: list) -> list[float]:
    """Validate one function's output; NaN where it does not apply."""
    n = len(completions)
    if not isinstance(values, (list, tuple)) and not (isinstance(values, torch.Tensor) and values.dim() == 1):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(values).__name__}; it must return a list with one "
            f"float (or None) per completion ({n} completions)")
    values = list(values.tolist() if isinstance(values, torch.Tensor) else values)
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} values for {n} completions; it must return one per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RewardFunctionError(
                f"reward function {name!r} returned {v!r} ({type(v).__name__}) for sample {i} "
                f"({_elide_middle(completion_text(completions[i]))!r}); rewards must be numbers or None")
        v = float(v)
        if math.isinf(v):
            raise RewardFunctionError(
                f"reward function {name!r} returned {v} for sample {i} "
                f"({_elide_middle(completion_text(completions[i]))!r}); rewards must be finite")
        if math.isnan(v):
            warnings.warn(f"reward function {name!r} returned NaN for sample {i}; treated as None "
                          f"(does not apply)", RewardWarning, stacklevel=3)
        out.append(v)
    return out


def default_trainer_state(global_step: int = 0, max_steps: int = 0):
    """What TRL passes as `trainer_state`: a transformers.TrainerState (global_step, max_steps, epoch, ...)."""
    from transformers import TrainerState

    return TrainerState(global_step=global_step, max_steps=max_steps)


def score_completions(reward_funcs, prompts: list, completions: list, columns: dict | None = None,
                      weights=None, timeout_s: float = 30.0, num_generations: int | None = None,
                      completion_ids: list[list[int]] | None = None, trainer_state=None) -> RewardScores:
    """Call each reward function on all N completions the way TRL does, check what it returns, combine.

    prompts, completions, completion_ids: [N] (as reward_inputs builds them); columns: name -> [N] values.
    A function that raises, hangs past timeout_s, or returns the wrong kind of values gets a
    RewardFunctionError naming it, the sample index and a shortened completion. Returns CPU tensors.
    """
    funcs = resolve_reward_funcs(reward_funcs)
    names = [reward_name(f) for f in funcs]
    declared = [reward_declaration(f) for f in funcs]
    w = torch.ones(len(funcs)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if len(w) != len(funcs):
        raise RewardFunctionError(f"{len(w)} reward weights for {len(funcs)} reward functions {names}")
    logged_metrics: dict[str, list[float]] = {}
    logged_columns: dict[str, list] = {}
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **(columns or {}),
              "trainer_state": trainer_state if trainer_state is not None else default_trainer_state(),
              "log_extra": lambda column, values: logged_columns.__setitem__(column, list(values)),
              "log_metric": lambda name, value: logged_metrics.setdefault(name, []).append(float(value))}
    cols = []
    for f, name in zip(funcs, names):
        start = time.monotonic()
        try:
            values = _call_with_timeout(f, timeout_s, kwargs)
        except RewardTimeout:
            raise RewardFunctionError(
                f"reward function {name!r} took more than reward_timeout_s={timeout_s}s on {len(completions)} "
                f"completions (started {time.monotonic() - start:.1f}s ago); make it faster or raise the limit"
            ) from None
        except RewardFunctionError:
            raise
        except Exception as e:
            raise RewardFunctionError(_describe_failure(f, name, e, kwargs)) from e
        cols.append(_checked_values(name, values, completions))
    per_func = torch.tensor(cols, dtype=torch.float32).T.reshape(len(completions), len(funcs))  # [N, F]
    if num_generations:
        _warn_inapplicable_groups(per_func, num_generations, prompts)
    return RewardScores(names, per_func, w, combine_rewards(per_func, w),
                        {k: sum(v) / len(v) for k, v in logged_metrics.items()}, logged_columns,
                        [span for span, _ in declared], [kind for _, kind in declared])


_PER_COMPLETION = ("prompts", "completions", "completion_ids")
_HOOKS = ("trainer_state", "log_extra", "log_metric")


def _accepts(f, kwargs: dict) -> bool:
    """Whether f's signature accepts these keyword arguments (False: it was not written for TRL's call)."""
    try:
        inspect.signature(f).bind(**kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (some builtins): assume it does
        return True
    return True


def _describe_failure(f, name, error, kwargs) -> str:
    """Find the first sample on which `f` fails when called alone, to name it in the message."""
    if isinstance(error, TypeError) and not _accepts(f, kwargs):
        dataset_columns = [k for k in kwargs if k not in _PER_COMPLETION and k not in _HOOKS]
        return (f"reward function {name!r} raised TypeError: {error}. Reward functions are called as TRL calls "
                f"them, with keyword arguments only: prompts=, completions=, completion_ids=, the dataset's columns "
                f"({', '.join(dataset_columns) or 'none'}), trainer_state=, log_extra=, log_metric=; give it "
                f"**kwargs for the ones it does not use")
    n = len(kwargs["completions"])
    for i in range(n):
        one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            f(**one)
        except Exception as e:  # this sample is the culprit
            return (f"reward function {name!r} raised {type(e).__name__}: {e} on sample {i} "
                    f"(completion {_elide_middle(completion_text(kwargs['completions'][i]))!r})")
    return f"reward function {name!r} raised {type(error).__name__}: {error} (on the whole batch)"


def _warn_inapplicable_groups(per_func: torch.Tensor, G: int, prompts: list) -> None:
    none_everywhere = torch.isnan(per_func).all(dim=1).reshape(-1, G).all(dim=1)  # [groups]
    for g in torch.nonzero(none_everywhere).flatten().tolist():
        warnings.warn(f"no reward function applies to any completion of group {g} (prompt "
                      f"{_elide_middle(str(prompts[g * G]))!r}); it is unscorable and teaches nothing",
                      RewardWarning, stacklevel=3)
