"""Reward functions and the rule that combines them.

A reward function has TRL's signature

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

one value per completion; `None` means "does not apply" (e.g. no gold answer) and is *not* a zero.
`columns` holds the dataset's other columns repeated per completion (e.g. `answer`).
Combining F functions with weights w:  total_i = sum_f w_f * r_{i,f}  over the f whose r_{i,f} applies.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass

import torch

from . import verify
from .answers import completion_text, extract_tagged_answer, numbers_equal, parse_number


class RewardFunctionError(ValueError):
    """A reward function misbehaved; the message names the function and the sample."""


class RewardWarning(UserWarning):
    pass


# ----------------------------------------------------------------------------------------------
# the reward library
# ----------------------------------------------------------------------------------------------


def regex_reward(pattern: str, name: str | None = None, flags: int = re.DOTALL, value: float = 1.0):
    """A format reward: `value` if the whole completion matches `pattern` (re.fullmatch), else 0."""
    compiled = re.compile(pattern, flags)

    def reward(prompts, completions, **columns):
        return [value if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    reward.__name__ = name or f"regex_reward({pattern!r})"
    reward.pattern = pattern
    return reward


# strict: the completion is (optional reasoning) then exactly one <answer>NUMBER</answer> and nothing after
STRICT_FORMAT = r"(?:<think>.*?</think>\s*)?[^<]*<answer>\s*-?[\d,]*\.?\d+\s*</answer>"
format_reward = regex_reward(STRICT_FORMAT, name="format")


def answer_reward(prompts, completions, answer=None, **columns):
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


def xml_count_reward(prompts, completions, **columns):
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


def length_reward(max_chars: int = 200, name: str = "length"):
    """1.0 for completions up to `max_chars` characters, decaying linearly to 0 at twice that."""

    def reward(prompts, completions, **columns):
        return [max(0.0, min(1.0, 2.0 - len(completion_text(c)) / max_chars)) for c in completions]

    reward.__name__ = name
    return reward


REWARD_FUNCS = {
    "format": format_reward,
    "answer": answer_reward,
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


# ----------------------------------------------------------------------------------------------
# scoring: call every function, check what it returns, combine with weights
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardScores:
    names: list[str]  # [F]
    per_func: torch.Tensor  # [N, F] float, NaN where a function does not apply
    weights: torch.Tensor  # [F]
    total: torch.Tensor  # [N] = nansum_f w_f * per_func[:, f]

    def as_lists(self) -> list[list[float | None]]:
        """[N][F] with None for "does not apply" (how StepRecord stores it)."""
        return [[None if math.isnan(v) else v for v in row] for row in self.per_func.tolist()]


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """total_i = sum_f w_f r_{i,f} over the functions that apply (NaN = does not apply).  [N, F] -> [N]"""
    return torch.nansum(per_func * weights[None, :], dim=1)


def _shorten(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]


def _call_with_timeout(fn, timeout_s: float, args: tuple, kwargs: dict):
    """Call fn; raise TimeoutError after timeout_s. In the main thread on POSIX SIGALRM interrupts the
    call itself; elsewhere the call runs in a daemon thread that is abandoned (it cannot be killed)."""
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        def on_alarm(signum, frame):
            raise TimeoutError

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError
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
                f"({_shorten(completion_text(completions[i]))!r}); rewards must be numbers or None")
        v = float(v)
        if math.isinf(v):
            raise RewardFunctionError(
                f"reward function {name!r} returned {v} for sample {i} "
                f"({_shorten(completion_text(completions[i]))!r}); rewards must be finite")
        if math.isnan(v):
            warnings.warn(f"reward function {name!r} returned NaN for sample {i}; treated as None "
                          f"(does not apply)", RewardWarning, stacklevel=3)
        out.append(v)
    return out


def score_completions(reward_funcs, prompts: list, completions: list, columns: dict | None = None,
                      weights=None, timeout_s: float = 30.0, num_generations: int | None = None) -> RewardScores:
    """Call each reward function on all N completions and combine them.

    prompts, completions: [N] (prompt repeated per completion); columns: name -> [N] values.
    A function that raises, hangs past timeout_s, or returns the wrong kind of values gets a
    RewardFunctionError naming it, the sample index and a shortened completion.
    """
    funcs = resolve_reward_funcs(reward_funcs)
    names = [reward_name(f) for f in funcs]
    w = torch.ones(len(funcs)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if len(w) != len(funcs):
        raise RewardFunctionError(f"{len(w)} reward weights for {len(funcs)} reward functions {names}")
    columns = columns or {}
    cols = []
    for f, name in zip(funcs, names):
        start = time.monotonic()
        try:
            values = _call_with_timeout(f, timeout_s, (prompts, completions), columns)
        except TimeoutError:
            raise RewardFunctionError(
                f"reward function {name!r} took more than reward_timeout_s={timeout_s}s on {len(completions)} "
                f"completions (started {time.monotonic() - start:.1f}s ago); make it faster or raise the limit"
            ) from None
        except RewardFunctionError:
            raise
        except Exception as e:
            raise RewardFunctionError(_describe_failure(f, name, e, prompts, completions, columns)) from e
        cols.append(_checked_values(name, values, completions))
    per_func = torch.tensor(cols, dtype=torch.float32).T.reshape(len(completions), len(funcs))  # [N, F]
    if num_generations:
        _warn_inapplicable_groups(per_func, num_generations, prompts)
    return RewardScores(names, per_func, w, combine_rewards(per_func, w))


def _describe_failure(f, name, error, prompts, completions, columns) -> str:
    """Find the first sample on which `f` fails when called alone, to name it in the message."""
    for i in range(len(completions)):
        try:
            f(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as e:  # this sample is the culprit
            return (f"reward function {name!r} raised {type(e).__name__}: {e} on sample {i} "
                    f"(completion {_shorten(completion_text(completions[i]))!r})")
    return f"reward function {name!r} raised {type(error).__name__}: {error} (on the whole batch)"


def _warn_inapplicable_groups(per_func: torch.Tensor, G: int, prompts: list) -> None:
    none_everywhere = torch.isnan(per_func).all(dim=1).reshape(-1, G).all(dim=1)  # [groups]
    for g in torch.nonzero(none_everywhere).flatten().tolist():
        warnings.warn(f"no reward function applies to any completion of group {g} (prompt "
                      f"{_shorten(completion_text(prompts[g * G]))!r}); its total is 0 and it teaches nothing",
                      RewardWarning, stacklevel=3)
