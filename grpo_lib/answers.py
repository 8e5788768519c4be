"""Reading answers out of text: completions, gold solutions, numbers. Plain Python, no torch.

Both the reward library (rewards.py) and the verifiable rewards (verify.py) parse answers with these
functions; this module imports nothing of grpo_lib, so imports run one way:
answers -> verify -> rewards, and data -> answers.
"""

from __future__ import annotations

import math
import re

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(c) -> str:
    """A completion as text: TRL passes plain strings, or chat messages [{"role", "content"}] per completion."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    if isinstance(c, dict):
        return str(c.get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(c).__name__}")


def parse_number(text: str | None) -> float | None:
    """'1,234' -> 1234.0, '$5' -> 5.0, '7.0' -> 7.0, '-3.' -> -3.0; None if `text` is not one number."""
    if text is None:
        return None
    t = str(text).strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        x = float(t)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def extract_tagged_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer> tag, stripped; None without a tag."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def extract_gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer is the text after '####' at the end of the solution."""
    if "####" not in solution:
        raise ValueError(f"no '####' answer marker in GSM8K solution: {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def numbers_equal(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    """a == b up to a relative tolerance; False when either is None."""
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))
