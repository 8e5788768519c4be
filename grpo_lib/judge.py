"""Run a row's tests -- the dataset's own, trusted test code -- against a program confined in another process.

    run_spec(spec, program) -> iterator of (test index, None | why it failed)
    count_tests(spec) -> int
    stdout_matches(output, expected) -> bool          stdin/stdout comparison, as APPS's harness does
    call_output_matches(output, expected) -> bool     call-based comparison, as APPS/TACO's harness does

This is the judge process's half of grpo_lib.sandbox (see its docstring for the processes). The program runs
confined in its own process P; the tests run here, in the judge process J, which the program cannot reach.
Every name the program defines is a `Proxy` here: calling it sends the plain arguments to P, where the
program's function runs, and brings back a plain value (None, bool, int, float, complex, str, bytes and
lists, tuples, dicts, sets, frozensets of them, read by exact type, so an int subclass is not one), or, for
anything else (an object of the program's own class, a generator), a handle: another Proxy. So the test code
runs unchanged -- `def check(candidate): assert candidate(2) == 4` with helpers, loops, all(...),
math.isclose, random inputs -- and every comparison, truth test and hash happens here, on plain values:

  - `==`, `<`, `in`, `bool()`, `hash()` of a Proxy never reach the program: a Proxy equals only itself, and
    its truth value raises TypeError. An object whose __eq__ always says True earns nothing.
  - What the test asks of a program object runs in P and is the program's answer: calling it, reading an
    attribute (`s.top`), len(), str(), iterating it (a generator). Each answer comes back plain or as a handle.
  - The expected values never enter P: only the arguments a test passes travel there.
  - A stdin/stdout program runs in P with a captured sys.stdin/sys.stdout; its output comes back as a str and
    is compared here (stdout_matches). Writes to other file descriptors are not its answer.

A test that raises fails; its reason is the exception. The program's exceptions reach the test as the
builtin exception of the same name (so `with pytest.raises(ValueError)`-style tests work), any other as
ProgramError. The process is killed at the sandbox's deadline, judging included: nothing here needs its own
time bound.

Spec kinds (built from dataset columns by grpo_lib.verify.test_spec):
  {"kind": "asserts", "setup": str, "tests": [str, ...]}        one test per snippet (MBPP test_list, `tests`)
  {"kind": "check", "setup": str, "test": str, "entry_point": str}   HumanEval: `test` then check(entry_point)
  {"kind": "stdio", "cases": [[stdin, expected stdout], ...]}    APPS/TACO/CodeContests
  {"kind": "call", "fn_name": str, "cases": [[args, expected], ...]}  APPS/TACO call-based (LeetCode style)

This module imports only the standard library (no torch, no grpo_lib): the sandbox's fork server loads it by
path into a process started with `python -I -S`.
"""

from __future__ import annotations

import builtins
import json
import math
import os

SPEC_KINDS = ("asserts", "check", "stdio", "call")
MAX_REPLY_BYTES = 8_000_000  # one reply of the program; a larger one ends the run (it cannot be read back)
_MAX_DEPTH = 40  # containers nested deeper are not plain values (the sandbox's encoder uses the same bound)


class ProgramGone(Exception):
    """The program's process ended (or sent something unreadable) while a test waited for an answer."""


class ProgramError(Exception):
    """The program raised an exception that is not a builtin one: 'Name: message'."""


def count_tests(spec: dict) -> int:
    """How many tests a spec has: one per snippet or case; one for a HumanEval check function."""
    return 1 if spec["kind"] == "check" else len(spec["tests" if spec["kind"] == "asserts" else "cases"])


# ----------------------------------------------------------------------------------------------
# the channel to the program's process, and the proxies that stand for its objects
# ----------------------------------------------------------------------------------------------

class Program:
    """Requests to the confined process P, one JSON line each way (see grpo_lib.sandbox._serve)."""

    def __init__(self, request_fd: int, reply_fd: int):
        self._request_fd = request_fd
        self._replies = os.fdopen(reply_fd, "rb")
        self.ended: dict | None = None  # P's last report when it ended: {"exit": wait status, "cpu": seconds}
        self.objects_seen: list[str] = []  # types of the non-plain answers since the current test began

    def read(self) -> dict:
        line = self._replies.readline(MAX_REPLY_BYTES + 1)
        if not line:
            raise ProgramGone("the program's process ended")
        if len(line) > MAX_REPLY_BYTES:
            raise ProgramGone(f"the program sent a reply over {MAX_REPLY_BYTES} bytes")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            raise ProgramGone("the program's process sent an unreadable reply") from None
        if type(reply) is not dict:
            raise ProgramGone("the program's process sent an unreadable reply")
        if "exit" in reply:
            self.ended = reply
            raise ProgramGone("the program's process ended")
        return reply

    def ask(self, request: dict):
        """Send one request, return its answer as a plain value or a Proxy; raise what the program raised."""
        data = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._request_fd, data):]
        except OSError:  # BrokenPipeError: the program's process is gone
            raise ProgramGone("the program's process ended") from None
        return self.answer(self.read())

    def answer(self, reply: dict):
        if "h" in reply:
            self.objects_seen.append(str(reply.get("type", "object"))[:80])
        if "ok" in reply:
            try:
                return untag(reply["ok"])
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                raise ProgramGone("the program's process sent an unreadable value") from None
        if "h" in reply:
            return Proxy(self, ["h", reply["h"]], str(reply.get("type", "object"))[:80])
        if "err" in reply:
            raise program_exception(str(reply["err"])[:80], str(reply.get("msg", ""))[:300])
        raise ProgramGone("the program's process sent an unreadable reply")


def program_exception(name: str, message: str) -> Exception:
    """The program's exception as this process can raise it: the builtin exception of that name (an
    Exception subclass: never SystemExit or KeyboardInterrupt, which would stop the judge), else ProgramError."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and name.isidentifier():
        try:
            return cls(message)
        except Exception:  # e.g. UnicodeDecodeError needs five arguments
            pass
    return ProgramError(f"{name}: {message}" if message else name)


class Proxy:
    """A name or object of the program, living in its process. Calls, attribute reads, len(), str() and
    iteration are asked of the program; comparisons, truth and hashing are not (see the module docstring)."""

    __slots__ = ("_program", "_ref", "_what")

    def __init__(self, program: Program, ref: list, what: str):
        self._program, self._ref, self._what = program, ref, what

    def __call__(self, *args, **kwargs):
        return self._program.ask({"op": "call", "ref": self._ref, "args": tag(list(args)),
                                  "kwargs": tag(dict(kwargs))})

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._program.ask({"op": "attr", "ref": self._ref, "name": name})

    def _view(self, fn: str):
        return self._program.ask({"op": "view", "ref": self._ref, "fn": fn})

    def __len__(self) -> int:
        n = self._view("len")
        if type(n) is not int:
            raise TypeError(f"len() of the program's {self._what} did not come back as a plain int")
        return n

    def __str__(self) -> str:
        s = self._view("str")
        if type(s) is not str:
            raise TypeError(f"str() of the program's {self._what} did not come back as a plain str")
        return s

    def __iter__(self):
        it = self._view("iter")
        if not isinstance(it, Proxy):  # iter() of a program object is always a handle, never plain
            raise TypeError(f"iter() of the program's {self._what} gave a plain value")
        return it

    def __next__(self):
        return self._view("next")

    def __repr__(self) -> str:  # for assertion messages: never asks the program
        return f"<the program's {self._what}>"

    def __bool__(self):
        raise TypeError(f"the truth value of the program's {self._what} is not plain data (a custom __bool__ "
                        f"could fake it); a test needs a plain value here")

    def __eq__(self, other):  # identity only: a custom __eq__ of the program never decides a test
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__


# ----------------------------------------------------------------------------------------------
# plain values on the wire: tagged JSON trees of builtins (the sandbox's encoder writes the same form)
# ----------------------------------------------------------------------------------------------

def tag(x, depth: int = 0):
    """A trusted value (the test's) as a tagged JSON tree; a Proxy as a reference to the program's object.
    Raises TypeError for anything else: only plain values travel to the program."""
    if depth > _MAX_DEPTH:
        raise TypeError(f"an argument nested more than {_MAX_DEPTH} deep cannot be sent to the program")
    if isinstance(x, Proxy):
        return ["H", x._ref]
    if x is None:
        return None
    if isinstance(x, bool):
        return bool(x)
    if isinstance(x, str):
        return str(x)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, complex):
        return ["c", x.real, x.imag]
    if isinstance(x, bytes):
        return ["b", bytes(x).hex()]
    if isinstance(x, dict):
        return ["D", [[tag(k, depth + 1), tag(v, depth + 1)] for k, v in x.items()]]
    for t, code in ((list, "L"), (tuple, "T"), (set, "S"), (frozenset, "F")):
        if isinstance(x, t):
            return [code, [tag(v, depth + 1) for v in x]]
    raise TypeError(f"a value of type {type(x).__name__} cannot be sent to the program: only plain values "
                    f"(None, bool, int, float, complex, str, bytes, and lists, tuples, dicts, sets of them) and "
                    f"the program's own objects travel")


def untag(x, depth: int = 0, resolve=None):
    """A tagged tree back to builtins. `resolve(ref)` turns an ["H", ref] into the object it names (the
    program's side); without it, references are refused (the judge's side: values only)."""
    if depth > _MAX_DEPTH + 1:
        raise ValueError("too deep")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list and len(x) in (2, 3) and type(x[0]) is str:
        code = x[0]
        if code == "b" and len(x) == 2:
            return bytes.fromhex(x[1])
        if code == "c" and len(x) == 3 and all(type(v) in (int, float) for v in x[1:]):
            return complex(x[1], x[2])
        if code == "H" and len(x) == 2 and resolve is not None:
            return resolve(x[1])
        if code == "D" and len(x) == 2:
            return {untag(k, depth + 1, resolve): untag(v, depth + 1, resolve) for k, v in x[1]}
        make = {"L": list, "T": tuple, "S": set, "F": frozenset}.get(code)
        if make is not None and len(x) == 2 and type(x[1]) is list:
            return make(untag(v, depth + 1, resolve) for v in x[1])
    raise ValueError(f"not an encoded value: {t.__name__}")


# ----------------------------------------------------------------------------------------------
# running a spec
# ----------------------------------------------------------------------------------------------

def program_namespace(program: Program, names: dict) -> dict:
    """The globals the test code starts from: each name the program defined, as a Proxy, or as its plain
    value when it has one (a constant). Modules the program imported are left out: a test imports its own."""
    ns = {"__name__": "__main__", "__builtins__": builtins}
    for name, kind in names.items():
        if kind == "module":
            continue
        if isinstance(kind, list) and kind[:1] == ["value"]:
            try:
                ns[name] = untag(kind[1])
                continue
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                pass
        ns[name] = Proxy(program, ["g", name], f"{name}")
    return ns


def describe(e: BaseException) -> str:
    """'AssertionError' or 'NameError: name 'x' is not defined' (at most 300 characters)."""
    msg = str(e)
    return (type(e).__name__ + (f": {msg}" if msg else ""))[:300]


def run_spec(spec: dict, program: Program, names: dict):
    """Yield (i, None) for each test that passed and (i, reason) for each that failed, in order. Stops early
    (the remaining tests are not yielded) when the program's process ends."""
    kind = spec["kind"]
    if kind in ("asserts", "check"):
        base = program_namespace(program, names)
        if spec.get("setup"):
            try:
                exec(compile(spec["setup"], "test_setup.py", "exec"), base)
            except ProgramGone:
                return
            except Exception as e:
                for i in range(count_tests(spec)):
                    yield i, f"the test's set-up code raised {describe(e)}"
                return
        sources = spec["tests"] if kind == "asserts" else [spec["test"] + f"\n\ncheck({spec['entry_point']})\n"]
        for i, source in enumerate(sources):
            program.objects_seen = []
            try:
                exec(compile(source, f"test_{i}.py", "exec"), dict(base))
            except ProgramGone:
                return
            except Exception as e:
                yield i, describe(e) + _not_plain_hint(program.objects_seen)
            else:
                yield i, None
    elif kind == "stdio":
        for i, (stdin, expected) in enumerate(spec["cases"]):
            try:
                output = program.ask({"op": "stdio", "stdin": stdin})
            except ProgramGone:
                return
            except Exception as e:
                yield i, f"the program raised {describe(e)}"
                continue
            yield i, None if stdout_matches(output, expected) else f"wrong output: {_clip(output)}"
    elif kind == "call":
        fn = _call_target(program, names, spec["fn_name"])
        for i, (args, expected) in enumerate(spec["cases"]):
            try:
                if fn is None:
                    raise NameError(f"the program defines no function or Solution method {spec['fn_name']!r}")
                output = fn(*args)
            except ProgramGone:
                return
            except Exception as e:
                yield i, describe(e)
                continue
            yield i, None if call_output_matches(output, expected) else f"returned {_clip(repr(output))}"
    else:
        raise ValueError(f"unknown spec kind {kind!r}; one of {SPEC_KINDS}")


def _not_plain_hint(types: list[str]) -> str:
    """Why a test that got objects instead of plain values probably failed, naming them."""
    if not types:
        return ""
    names = ", ".join(dict.fromkeys(types))
    return (f" (the program answered with {names}, not plain data: its own __eq__, __bool__ or __hash__ "
            f"never decides a test)")


def _call_target(program: Program, names: dict, fn_name: str):
    """The function a call-based case calls: a top-level function, or a method of `class Solution`
    (LeetCode-style rows), as APPS/TACO's harness looks it up."""
    if fn_name in names and names[fn_name] != "module":
        return Proxy(program, ["g", fn_name], fn_name)
    if "Solution" in names:
        try:
            return getattr(Proxy(program, ["g", "Solution"], "Solution")(), fn_name)
        except (ProgramGone, Exception):
            return None
    return None


def _clip(text: str, n: int = 80) -> str:
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= n else text[:n] + "..."


# ----------------------------------------------------------------------------------------------
# comparing outputs as the datasets' harnesses do
# ----------------------------------------------------------------------------------------------

def as_text(value) -> str:
    """An `input_output` input or output as text: a list of lines is joined with newlines (APPS stores both)."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def stdout_matches(output, expected) -> bool:
    """APPS's stdin/stdout comparison (testing_util.py): equal after stripping, or line by line with each line
    stripped (blank lines ignored), or token by token, where tokens that are all numbers compare as
    np.allclose does (|a - b| <= 1e-8 + 1e-5 * |b|)."""
    if type(output) is not str:
        return False
    expected = as_text(expected)
    if output.strip() == expected.strip():
        return True
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    want = [line.strip() for line in expected.strip().splitlines() if line.strip()]
    if lines == want:
        return True
    got, exp = output.split(), expected.split()
    if got == exp:
        return True
    if len(got) != len(exp):
        return False
    try:
        a, b = [float(t) for t in got], [float(t) for t in exp]
    except ValueError:
        return False
    return all(math.isfinite(x) and math.isfinite(y) and abs(x - y) <= 1e-8 + 1e-5 * abs(y) for x, y in zip(a, b))


def _listify(x):
    """Tuples as lists, all the way down (JSON has no tuples: a dataset's expected value never holds one)."""
    if isinstance(x, (list, tuple)):
        return [_listify(v) for v in x]
    if isinstance(x, dict):
        return {k: _listify(v) for k, v in x.items()}
    return x


def call_output_matches(output, expected) -> bool:
    """APPS/TACO's call-based comparison: the return value (tuples read as lists) equals the expected value, or
    its only element when the dataset wrapped it in a list (`outputs: [[3]]` for a function returning 3).
    A Proxy (not plain data) never matches."""
    if isinstance(output, Proxy) or _holds_proxy(output):
        return False
    out = _listify(output)
    if out == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and out == expected[0]


def _holds_proxy(x, depth: int = 0) -> bool:
    if isinstance(x, Proxy):
        return True
    if depth > _MAX_DEPTH or not isinstance(x, (list, tuple, set, frozenset, dict)):
        return False
    items = list(x.items()) if isinstance(x, dict) else list(x)
    return any(_holds_proxy(v, depth + 1) for v in items)
