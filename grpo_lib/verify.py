"""Verifiable rewards beyond regexes: math answers compared by value, code run against tests.

    math_equal(pred, gold, percent_ok=False) -> bool        '1/2' == '0.5' == '\\frac{1}{2}', 'x=3' == '3'
    math_answer_reward(completions, answer, **kwargs) -> [1.0 | 0.0 | None]
    extract_code(text) -> str | None                        last ```python fenced block
    code_syntax_reward(completions, **kwargs) -> [1.0 | 0.0]
    code_tests_reward(completions, tests, **kwargs) -> [passed / total | None]

All rewards follow grpo_lib.rewards' convention: one value per completion, None = "does not apply".

Math backends. "math_verify" (Hugging Face's math-verify, pip install math-verify) parses LaTeX and plain
expressions into sympy and compares them symbolically; it runs in a child process because sympy can
spend forever in C code on an answer such as 10^{10^{10}}, where no signal or timeout reaches it, and a
process can be killed. "fallback" (used when math_verify is not installed) is hand-written and numeric
only: integers, decimals, a/b, \\frac/\\dfrac/\\tfrac, thousands separators, '$', \\text{units}, \\boxed{},
'x = ' prefixes and percent signs; it has no symbolic algebra (sqrt(2)/2 vs 1/sqrt(2) is False).
Both backends share `_prepare` (digit groups, percent sign) and pass the same table of tests.

Percent: with percent_ok=False a trailing % is a unit ('50%' == '50', != '0.5'); with percent_ok=True
'50%' also equals 0.5 (both readings are accepted, as math_verify does).
"""

from __future__ import annotations

import ast
import atexit
import importlib.util
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction

from grpo_lib import judge, sandbox
from grpo_lib.answers import completion_text, extract_gsm8k_gold, extract_tagged_answer

# no torch here (nor grpo_lib.rewards, which imports this module): the math worker process imports this
# module and should start in half a second, not three.

MAX_ANSWER_CHARS = 500
"""Answers longer than this are not parsed (never equal): GSM8K/MATH answers are short."""
MAX_CODE_CHARS = 100_000
"""Code longer than this is neither parsed nor run."""


def default_backend() -> str:
    """'math_verify' when the package is importable, else 'fallback'."""
    return "math_verify" if importlib.util.find_spec("math_verify") is not None else "fallback"


# ----------------------------------------------------------------------------------------------
# math: equivalence of two answer strings
# ----------------------------------------------------------------------------------------------

_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*percent\s*\}|percent)\s*$")
_GROUPED = re.compile(r"(?<![\d.])\d{1,3}(?:(?:,|\{,\}|\\[,;: ]|\\ | )\d{3})+(?![\d,])")


def _prepare(s, percent_ok: bool) -> str:
    """Shared by both backends: trim, drop a sentence's final period, join digit groups ('1,000',
    '1{,}000', '1\\,000', '1 000' -> '1000') of a lone number, and unless percent_ok drop a trailing %."""
    s = str(s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if not percent_ok:
        s = _PERCENT.sub("", s)
    m = _GROUPED.search(s)
    # only a lone number: in '(1,234)' or '1,234, 5' the comma separates items
    if m and not re.search(r"[(\[{},;]", s[: m.start()] + s[m.end():]):
        s = s[: m.start()] + re.sub(r"\D", "", m.group()) + s[m.end():]
    return s


def math_equal(pred: str, gold: str, percent_ok: bool = False, backend: str | None = None,
               timeout_s: float = 10.0) -> bool:
    """True if `pred` and `gold` denote the same value. backend: 'math_verify' | 'fallback' | None (the
    default_backend()). timeout_s bounds one comparison (math_verify only); a slower one is False."""
    return math_equal_many([(pred, gold)], percent_ok, backend, timeout_s)[0]


def math_equal_many(pairs, percent_ok: bool = False, backend: str | None = None, timeout_s: float = 10.0,
                    batch_timeout_s: float | None = None) -> list[bool]:
    """math_equal over [(pred, gold), ...]; with math_verify, one round trip to the worker process.
    batch_timeout_s bounds the whole call: pairs not compared by then are False (with a warning)."""
    backend = backend or default_backend()
    if backend not in ("math_verify", "fallback"):
        raise ValueError(f"backend={backend!r}; choose 'math_verify', 'fallback' or None (automatic)")
    pairs = [(_prepare(p, percent_ok), _prepare(g, percent_ok)) for p, g in pairs]
    ok = [0 < len(p) <= MAX_ANSWER_CHARS and 0 < len(g) <= MAX_ANSWER_CHARS for p, g in pairs]
    todo = [pair for pair, k in zip(pairs, ok, strict=True) if k]
    if backend == "math_verify":
        results = iter(_MATH_VERIFY.equal_many(todo, percent_ok, timeout_s, batch_timeout_s))
    else:
        results = iter([_fallback_equal(p, g, percent_ok) for p, g in todo])
    return [next(results) if k else False for k in ok]


# --- backend 1: math_verify, in a worker process ----------------------------------------------


def _library_equal(pred: str, gold: str, percent_ok: bool) -> bool:
    """math_verify on prepared strings; runs in the worker process. Each side is read as LaTeX ('$..$',
    which also covers plain numbers and 'x = 3'), and only if that finds nothing as plain text: plain text
    takes the *last* number, so reading both ways would let '4 or 3' match 3."""
    from math_verify import parse, verify

    def read(s: str) -> list:
        return parse("$" + s + "$", parsing_timeout=3) or parse(s, parsing_timeout=3)

    try:
        g, p = read(gold), read(pred)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=3))
    except Exception:  # MemoryError on a huge power, a parser bug: not equal
        return False


def _math_worker_main() -> None:
    """Worker process: reads {"pairs": [[pred, gold], ...], "percent_ok": bool} lines from stdin and
    writes one '1' or '0' line per pair. Run by _MathVerifyProcess, not by hand."""
    import logging
    import resource

    replies = os.fdopen(os.dup(1), "w")  # a private copy of stdout: a library print cannot corrupt replies
    os.dup2(2, 1)
    limit = 2 << 30  # 10^{10^{10}} then fails with MemoryError instead of filling the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)  # math_verify logs every unparsable answer
    import math_verify  # noqa: F401  (import cost paid before "ready")

    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        for pred, gold in request["pairs"]:
            replies.write("1\n" if _library_equal(pred, gold, request["percent_ok"]) else "0\n")
            replies.flush()


class _MathVerifyProcess:
    """The math_verify worker, started on first use, killed and restarted after a comparison that takes
    longer than timeout_s (that comparison is False). Thread-safe; one per trainer process."""

    def __init__(self):
        self.proc = None
        self.buf = b""
        self.lock = threading.Lock()

    def equal_many(self, pairs: list, percent_ok: bool, timeout_s: float,
                   batch_timeout_s: float | None = None) -> list[bool]:
        end = float("inf") if batch_timeout_s is None else time.monotonic() + batch_timeout_s
        with self.lock:
            out: list[bool] = []
            while len(out) < len(pairs):
                if time.monotonic() >= end:
                    warnings.warn(f"math_verify: {len(pairs) - len(out)} of {len(pairs)} comparisons not done "
                                  f"within batch_timeout_s={batch_timeout_s} s; scored as not equal",
                                  RuntimeWarning, stacklevel=3)
                    return out + [False] * (len(pairs) - len(out))
                out += self._send(pairs[len(out):], percent_ok, timeout_s, end)
            return out

    def _send(self, pairs: list, percent_ok: bool, timeout_s: float, end: float) -> list[bool]:
        """Answers for `pairs` in order, or for a prefix ending with a pair that timed out (False)."""
        try:
            proc = self._start()
            proc.stdin.write((json.dumps({"pairs": pairs, "percent_ok": percent_ok}) + "\n").encode())
            proc.stdin.flush()
            out = []
            for pred, gold in pairs:
                line = self._readline(min(time.monotonic() + timeout_s, end))
                if line is None:
                    self.close()
                    warnings.warn(f"math_verify did not answer within timeout_s={timeout_s} s (or the batch "
                                  f"deadline), or crashed, comparing {pred[:60]!r} with gold {gold[:60]!r}; "
                                  f"scored as not equal", RuntimeWarning, stacklevel=4)
                    return out + [False]
                out.append(line == b"1")
            return out
        except BaseException:  # e.g. rewards.RewardTimeout fired mid-batch: the replies are out of step
            self.close()
            raise

    def _start(self):
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        self.close()
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from grpo_lib.verify import _math_worker_main; _math_worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        if self._readline(time.monotonic() + 60) != b"ready":
            self.close()
            raise RuntimeError("the math_verify worker process did not start (is math-verify installed for "
                               f"{sys.executable}?); pass backend='fallback' to use the hand-written parser")
        return self.proc

    def _readline(self, deadline: float) -> bytes | None:
        """Next reply line, or None at the deadline or if the worker died."""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
        self.proc, self.buf = None, b""


_MATH_VERIFY = _MathVerifyProcess()
atexit.register(_MATH_VERIFY.close)


# --- backend 2: hand-written, numeric only ----------------------------------------------------

_UNITS = re.compile(r"\\(?:text|textrm|mathrm|mbox)\s*\{[^{}]*\}")
_ASSIGN = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_FRAC = re.compile(r"(-?)\\[dt]?frac\s*(?:\{([^{}]+)\}|(\d))\s*(?:\{([^{}]+)\}|(\d))")
_SLASH = re.compile(r"(-?[\d.]+)\s*/\s*(-?[\d.]+)")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def _fallback_equal(pred: str, gold: str, percent_ok: bool) -> bool:
    """Numeric equality of prepared strings: exact for fractions, else |a - b| <= 1e-6 * max(1, |b|)
    (as math_verify rounds floats); strings that are not numbers must match exactly."""
    p, g = _fallback_values(pred, percent_ok), _fallback_values(gold, percent_ok)
    if p and g:
        return any(abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b)) for a in p for b in g)
    return not p and not g and re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", gold)


def _fallback_values(s: str, percent_ok: bool) -> list[Fraction]:
    """'\\boxed{x = \\$1,000}' -> [1000]; '50\\%' -> [50, 1/2] with percent_ok; [] if not a number."""
    t = unwrap_boxed(s)
    t = _UNITS.sub("", t)
    for junk in ("\\$", "$", "\\left", "\\right", "\\!", "\\,", "\\ "):
        t = t.replace(junk, "")
    t = _ASSIGN.sub("", t.strip())
    is_percent = t.endswith("%")
    t = t.removesuffix("%").removesuffix("\\").strip()
    value = _to_fraction(t)
    if value is None:
        return []
    return [value, value / 100] if is_percent and percent_ok else [value]


def _to_fraction(t: str) -> Fraction | None:
    """'3', '-0.25', '7.', '2/4', '\\frac{1}{2}', '-\\dfrac12' -> Fraction; None otherwise."""
    if m := _FRAC.fullmatch(t):
        num, den = _to_fraction(m.group(2) or m.group(3)), _to_fraction(m.group(4) or m.group(5))
        if num is None or not den:
            return None
        return -num / den if m.group(1) else num / den
    if m := _SLASH.fullmatch(t):
        num, den = _to_fraction(m.group(1)), _to_fraction(m.group(2))
        return num / den if num is not None and den else None
    if _DECIMAL.fullmatch(t):
        return Fraction(t.rstrip(".") or "0")
    return None


# ----------------------------------------------------------------------------------------------
# math: the reward
# ----------------------------------------------------------------------------------------------


def unwrap_boxed(text: str) -> str:
    """'\\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}' when the whole text is one \\boxed{...}; else text."""
    t = text.strip()
    if t.startswith("\\boxed{") and _closing_brace(t, len("\\boxed")) == len(t) - 1:
        return t[len("\\boxed{"): -1].strip()
    return text


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces matched), None if there is none or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = _closing_brace(text, start + len("\\boxed"))
    return None if end is None else text[start + len("\\boxed{"): end].strip()


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the '}' matching the '{' at text[open_at]; None if it is never closed."""
    depth = 0
    for j in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return None


def extract_final_answer(text: str) -> str | None:
    """The last <answer>...</answer>, else the last \\boxed{...}; None if neither."""
    tagged = extract_tagged_answer(text)
    return tagged if tagged is not None else last_boxed(text)


def _gold_text(gold) -> str | None:
    """A gold answer as text; a full GSM8K solution is cut to what follows '####'."""
    if gold is None:
        return None
    text = str(gold).strip()
    if "####" in text:
        text = extract_gsm8k_gold(text)
    return text or None


def make_math_answer_reward(percent_ok: bool = False, backend: str | None = None, timeout_s: float = 10.0,
                            batch_timeout_s: float = 20.0, name: str = "math_equal"):
    """A reward: 1.0 if the completion's final answer equals the gold `answer` column by math_equal,
    0.0 if not or if there is no answer, None where the row has no gold answer. One comparison may take
    timeout_s, all of a call batch_timeout_s (keep it below the trainer's reward_timeout_s=30)."""

    def reward(completions, answer=None, **kwargs):
        if answer is None:
            return [None] * len(completions)
        golds = [_gold_text(a) for a in answer]
        preds = [extract_final_answer(completion_text(c)) for c in completions]
        rows = [i for i, (p, g) in enumerate(zip(preds, golds, strict=True)) if p is not None and g is not None]
        equal = math_equal_many([(preds[i], golds[i]) for i in rows], percent_ok, backend, timeout_s,
                                batch_timeout_s)
        out: list[float | None] = [None if g is None else 0.0 for g in golds]
        for i, e in zip(rows, equal, strict=True):
            out[i] = 1.0 if e else 0.0
        return out

    reward.__name__ = name
    reward.required_columns = ("answer",)  # checked against the dataset by the trainer
    return reward


math_answer_reward = make_math_answer_reward()


# ----------------------------------------------------------------------------------------------
# code: extraction, syntax, tests
# ----------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """Body of the last closed ```python (or ```py, ```python3, untagged) fenced block; None if none.
    An unclosed block (generation cut off) does not count."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("python", "py", "python3", "")]
    return blocks[-1] if blocks else None


def parses(code: str | None) -> bool:
    """True if `code` is syntactically valid Python. ast.parse only: nothing is compiled or run."""
    if code is None or len(code) > MAX_CODE_CHARS:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for '\d' in a string is not our business
            ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def code_syntax_reward(completions, **kwargs):
    """1.0 if the completion has a fenced Python block that parses, else 0.0."""
    return [1.0 if parses(extract_code(completion_text(c))) else 0.0 for c in completions]


code_syntax_reward.__name__ = "code_syntax"
code_syntax_reward.reward_range = (0.0, 1.0)
code_syntax_reward.reward_kind = "format"


def split_tests(tests) -> list[str]:
    """A row's `tests` as a list of snippets: a list of assert strings as is; one string of several
    asserts split into one test per assert (statements before an assert run with it); None -> []."""
    if tests is None:
        return []
    if not isinstance(tests, str):
        return [str(t) for t in tests if str(t).strip()]
    try:
        body = ast.parse(tests).body
    except SyntaxError:
        return [tests] if tests.strip() else []
    out, pending = [], []
    for stmt in body:
        pending.append(ast.get_source_segment(tests, stmt))
        if isinstance(stmt, ast.Assert):
            out.append("\n".join(pending))
            pending = []
    if pending:  # statements after the last assert belong to it
        out = out[:-1] + ["\n".join(out[-1:] + pending)]
    return out


CODE_TEST_COLUMNS = ("input_output", "test", "entry_point", "test_list", "test_imports", "test_setup_code",
                     "tests", "fn_name")
"""The dataset columns the code reward reads, as the datasets ship them: APPS/TACO/CodeContests-style
`input_output` (+ `fn_name`), HumanEval's `test` + `entry_point`, MBPP's `test_list` (+ `test_imports`,
`test_setup_code`), and the workbench's own `tests` (assert strings)."""


@dataclass
class CodeJob:
    """What one row asks of one program: its test spec (grpo_lib.judge), the code that runs before the
    program (MBPP's test_imports; HumanEval's prompt when the completion continues it) and the way it runs."""

    spec: dict
    prelude: str = ""
    stdio: bool = False
    continues_prompt: bool = False  # HumanEval: the completion may be the body that continues `prompt`
    entry_point: str | None = None


def _column_error(column: str, row: int | None, what: str) -> ValueError:
    where = f"row {row}: " if row is not None else ""
    return ValueError(f"{where}column {column!r}: {what}")


def _string_list(value, column: str, row: int | None) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _column_error(column, row, f"expected a list of strings, got {type(value).__name__}")
    return list(value)


def code_job(row: dict, index: int | None = None) -> CodeJob | None:
    """The tests of one dataset row, read from its columns unchanged (CODE_TEST_COLUMNS, first match in that
    order); None when the row has none of them (the reward does not apply). A malformed column raises
    ValueError naming the row and the column.

        {"input_output": '{"inputs": ["1 2\\n"], "outputs": ["3\\n"]}'}          stdin/stdout (APPS, TACO)
        {"input_output": {"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}}   call-based
        {"test": "def check(candidate): ...", "entry_point": "add"}             HumanEval
        {"test_list": ["assert add(1, 2) == 3"], "test_imports": ["import math"]} MBPP
        {"tests": ["assert add(1, 2) == 3"]}                                     this workbench's own tasks
    """
    io_spec = row.get("input_output")
    if io_spec not in (None, ""):
        return _input_output_job(io_spec, row.get("fn_name"), index)
    if row.get("test") not in (None, "") or row.get("entry_point") not in (None, ""):
        test, entry = row.get("test"), row.get("entry_point")
        if not isinstance(test, str) or not test.strip():
            raise _column_error("test", index, "HumanEval-style rows need the test code (a string defining check)")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise _column_error("entry_point", index, f"expected the name of the function under test, got {entry!r}")
        return CodeJob({"kind": "check", "setup": "", "test": test, "entry_point": entry},
                       continues_prompt=True, entry_point=entry)
    if row.get("test_list") not in (None, ""):
        tests = _string_list(row["test_list"], "test_list", index)
        imports = row.get("test_imports") or []
        imports = _string_list(imports, "test_imports", index) if not isinstance(imports, str) else [imports]
        setup = row.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise _column_error("test_setup_code", index, f"expected a string, got {type(setup).__name__}")
        prelude = "\n".join(imports)
        return CodeJob({"kind": "asserts", "setup": "\n".join(filter(None, [prelude, setup])), "tests": tests},
                       prelude=prelude) if tests else None
    if row.get("tests") is not None:
        tests = split_tests(row["tests"])
        return CodeJob({"kind": "asserts", "setup": "", "tests": tests}) if tests else None
    return None


def _input_output_job(value, fn_name, index: int | None) -> CodeJob | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise _column_error("input_output", index, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise _column_error("input_output", index, f"expected a JSON object, got {type(value).__name__}")
    inputs, outputs = value.get("inputs"), value.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise _column_error("input_output", index, "needs 'inputs' and 'outputs' lists of the same length")
    if not inputs:
        return None
    fn_name = value.get("fn_name") or fn_name
    if fn_name:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise _column_error("fn_name", index, f"expected a function name, got {fn_name!r}")
        bad = next((i for i, a in enumerate(inputs) if not isinstance(a, list)), None)
        if bad is not None:
            raise _column_error("input_output", index, f"call-based inputs[{bad}] must be a list of arguments")
        return CodeJob({"kind": "call", "fn_name": fn_name, "cases": [[a, o] for a, o in zip(inputs, outputs)]})
    from grpo_lib.judge import as_text

    return CodeJob({"kind": "stdio", "cases": [[as_text(a), o] for a, o in zip(inputs, outputs)]}, stdio=True)


def _defines(code: str, name: str) -> bool:
    """True if `code` parses and defines `name` at top level (a def, class or assignment)."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def program_source(job: CodeJob, completion: str, prompt=None) -> str | None:
    """The program a completion stands for: its last ```python block (for a HumanEval row, the raw completion
    when it has none: HumanEval completions continue the prompt), after the row's prelude. For a HumanEval row
    whose prompt is the function's signature and docstring (a plain-text prompt that parses as Python), the
    prompt comes first, as HumanEval's own harness runs `prompt + completion`: a completion that continues it
    becomes its body, one that defines the function again replaces it (the prompt's imports and helpers stay)."""
    code = extract_code(completion)
    if code is None and job.continues_prompt:
        code = completion
    if code is None or len(code) > MAX_CODE_CHARS:
        return None
    if job.continues_prompt and isinstance(prompt, str) and parses(prompt + "    pass\n"):
        code = prompt + code if not _defines(code, job.entry_point) else prompt + "    pass\n\n" + code
    return "\n".join(filter(None, [job.prelude, code]))


def _why_no_program(text: str) -> str:
    if len(text) > MAX_CODE_CHARS:
        return f"no program: the completion is longer than MAX_CODE_CHARS={MAX_CODE_CHARS}"
    if "```" in text:
        return "no program: the ```python code block is not closed (cut off at max_completion_length?)"
    return "no program: no ```python code block"


def score_code(completions, tests=None, limits: sandbox.SandboxLimits | None = None, max_workers: int | None = None,
               deadline_s: float | None = None, prompts=None, **columns) -> list[sandbox.SandboxResult | None]:
    """Run each completion's program against its row's tests in the sandbox (bounded pool).
    [N] completions, and per-row columns as the dataset has them (CODE_TEST_COLUMNS; `tests` may be given
    positionally) -> [N] SandboxResult (with .reason and .failures), None where the row has no tests.

    The tests are the dataset's own code, run outside the program's process on the plain values it sends
    back (grpo_lib.judge): an object that claims to equal anything earns nothing."""
    if tests is not None:
        columns["tests"] = tests
    columns = {k: v for k, v in columns.items() if k in CODE_TEST_COLUMNS and v is not None}
    for k, v in columns.items():
        if len(v) != len(completions):
            raise ValueError(f"column {k!r} has {len(v)} values for {len(completions)} completions")
    jobs, rows = [], []
    out: list[sandbox.SandboxResult | None] = [None] * len(completions)
    for i, c in enumerate(completions):
        job = code_job({k: v[i] for k, v in columns.items()}, i)
        if job is None:
            continue
        prompt = prompts[i] if prompts is not None else None
        text = completion_text(c)
        program = program_source(job, text, prompt)
        if program is None:
            out[i] = sandbox.SandboxResult(0, judge.count_tests(job.spec), _why_no_program(text))
            continue
        jobs.append((program, job.spec, job.stdio))
        rows.append(i)
    for i, result in zip(rows, sandbox.run_many(jobs, limits, max_workers, deadline_s), strict=True):
        out[i] = result
    return out


def make_code_tests_reward(limits: sandbox.SandboxLimits | None = None, max_workers: int | None = None,
                           batch_timeout_s: float = 20.0, name: str = "code_tests"):
    """A reward: tests passed / total for each completion, from the row's test columns as the dataset ships
    them (CODE_TEST_COLUMNS: HumanEval, MBPP, APPS/TACO stdin/stdout and call-based, or `tests`), None where a
    row has none. The tests run outside the program (see score_code), so an object that claims to equal
    anything scores 0 (EQ_HACK_COMPLETION). A HumanEval row has one test (its check function): 1 or 0.

    All completions of a call share batch_timeout_s, judging included (keep it below the trainer's
    reward_timeout_s=30): worst case, every program loops, the call takes about batch_timeout_s, and the
    programs it had no time to start score 0.0 (with a warning naming the fix)."""

    def reward(completions, prompts=None, log_extra=None, **kwargs):
        columns = {k: v for k, v in kwargs.items() if k in CODE_TEST_COLUMNS}
        results = score_code(completions, columns.pop("tests", None), limits, max_workers, batch_timeout_s,
                             prompts=prompts, **columns)
        skipped = sum(r is not None and r.reason.startswith("not run") for r in results)
        if skipped:
            warnings.warn(f"{name}: {skipped} of {len(results)} programs not run within batch_timeout_s="
                          f"{batch_timeout_s} s and scored 0; raise it (and reward_timeout_s), lower "
                          f"SandboxLimits.timeout_s, or raise max_workers", RuntimeWarning, stacklevel=2)
        if results and all(r is None for r in results) and not any(k in kwargs for k in CODE_TEST_COLUMNS):
            warnings.warn(f"{name}: no row has test columns (one of {', '.join(CODE_TEST_COLUMNS)}); every "
                          f"completion is unscorable", RuntimeWarning, stacklevel=2)
        if log_extra is not None:  # the verdicts travel with the step record (the completion inspector shows them)
            log_extra(f"{name}/verdict", [None if r is None else r.reason for r in results])
        return [None if r is None else r.fraction for r in results]

    reward.__name__ = name
    reward.required_columns = ()  # any one of CODE_TEST_COLUMNS; a row with none is unscorable (None)
    reward.reward_range = (0.0, 1.0)
    reward.reward_kind = "correctness"
    return reward


code_tests_reward = make_code_tests_reward()


# ----------------------------------------------------------------------------------------------
# a tiny code task for CPU notebooks
# ----------------------------------------------------------------------------------------------

SUM_LIST_TASK = {
    "name": "sum_list",
    "prompt": ("Write a Python function `sum_list(xs)` that returns the sum of the numbers in the list `xs` "
               "(0 for an empty list). Answer with one ```python code block and nothing else."),
    "tests": [
        "assert sum_list([1, 2, 3]) == 6",
        "assert sum_list([]) == 0",
        "assert sum_list([-4, 4, 10]) == 10",
        "assert sum_list([0.5, 0.25]) == 0.75",
    ],
    "reference": "```python\ndef sum_list(xs):\n    return sum(xs)\n```",
}
"""prompt (str), tests (assert strings for code_tests_reward's `tests` column), reference (a completion
that passes every test). E.g. code_tests_reward([completion], tests=[SUM_LIST_TASK["tests"]]) -> [1.0]."""

EQ_HACK_COMPLETION = """Here is a solution that passes every test:
```python
class Anything:
    def __eq__(self, other):
        return True

def sum_list(xs):
    return Anything()
```"""
"""A reward hack on SUM_LIST_TASK: sum_list returns an object that claims to equal anything. Tests run in the
program's own interpreter all pass (tests/test_verify.py checks this):

    ns = {}; exec(extract_code(EQ_HACK_COMPLETION), ns); exec("assert sum_list([1, 2, 3]) == 6", ns)  # passes

but code_tests_reward scores it 0.0, because the asserts run in another process, where sum_list's answer is
a handle that equals only itself; score_code's reason names the object: "4/4 tests failed; first: test 0:
AssertionError (the program answered with Anything, not plain data: ...)"."""
