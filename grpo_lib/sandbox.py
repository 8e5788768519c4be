"""Run untrusted Python (model-generated code) against test cases in a separate, limited process.

    run_untrusted(code, tests, limits) -> SandboxResult(passed, total, reason, output, ...)
    run_many([(code, tests), ...], limits, max_workers, deadline_s) -> [SandboxResult]   (bounded pool)

`tests` are Python snippets, usually one `assert` each; a test passes if, after the code ran, its statements
run without raising and each of its asserts holds, judged by this (the parent) process on plain values the
program sent back (see "How tests are judged" below).

Each program runs as `python -I -S -B sandbox.py --child <payload>`: isolated mode (no PYTHON* variables,
no user site), no site-packages (standard library only), no .pyc writes. The child reads its payload,
confines itself (below), runs the code and the tests, and reports each step on a private pipe, every line
prefixed by a per-run random nonce so that text the program prints or writes to other descriptors is never
taken for a result. The parent enforces the wall clock and the output cap.

What is isolated, and where
---------------------------
Checked on Linux as root with CAP_SYS_ADMIN (this dev container) by tests/test_sandbox.py. Every run
reports the layers that actually engaged in `SandboxResult.isolation`; check it on a new platform.

  every POSIX platform
    - separate process in a new session; the parent kills the whole process group (SIGKILL) at the
      wall-clock limit, so the harness never waits longer than `timeout_s` (+ ~0.1 s) per program
    - rlimits: CPU seconds, address space (memory), size of any written file, open files, no core
      dumps; macOS does not enforce RLIMIT_AS, so memory is not limited there
    - environment: PATH, HOME=TMPDIR=<temp dir>, LANG only, so no API keys or tokens are inherited
    - working directory: a fresh tempfile.mkdtemp(), removed afterwards; stdin is /dev/null
    - stdout+stderr and the result pipe are read with caps; past `max_output_bytes` the program is killed
    - Python audit hook (sys.addaudithook), installed before the program runs: blocks process creation
      (os.fork, os.system, exec*, posix_spawn, subprocess), signals (os.kill, killpg, pthread_kill),
      every socket operation, ctypes, resource.setrlimit, os.chdir, os.link/symlink, gc and
      sys._current_frames introspection, writes, deletes, renames, chmod etc. outside the temp dir, reads
      and listings outside the temp dir and the standard library (so no ~/.netrc,
      ~/.cache/huggingface/token, /proc/<pid>/environ), os.open outside the temp dir, paths that are not
      str or bytes (pathlib.Path too: its __fspath__ could answer differently at the check and at the
      open), and re-importing the modules whose unaudited escape hatches it deletes (os.setsid, setpgid,
      setpgrp, pidfd_open, signal.pidfd_send_signal, _posixsubprocess, ctypes).
      CPython documents audit hooks as *not* a sandbox: code that corrupts interpreter memory can get
      past them. They are defense in depth; the kernel layers below are the boundary where available.
  Linux, parent running as root (containers, Colab)
    - the child drops to uid/gid `sandbox_uid` (65534, nobody) with no supplementary groups: the kernel
      then refuses signals to the trainer, reading root's files (e.g. /proc/<trainer>/environ, /root),
      writing outside world-writable directories, and enforces RLIMIT_NPROC (root ignores RLIMIT_NPROC).
      Where the interpreter's files are unreadable to that uid (e.g. a pyenv under /root, as here), the
      program can import only the modules in `SandboxLimits.preimport`; stdlib in /usr (Colab) is fine.
  Linux, where unshare(2) is permitted (root with CAP_SYS_ADMIN, or unprivileged user namespaces)
    - network namespace: only a loopback interface that is down, so every connection fails
    - PID namespace: the program is pid 1 of its own namespace, sees no other pid to signal, and when it
      dies (or its supervisor is killed) the kernel kills every process it left behind
    Docker's default seccomp profile, and hence many hosted notebooks, refuse unshare: there `isolation`
    lacks "netns"/"pidns" and network access is blocked only by the audit hook. Not tested on Colab.
  Linux, not root, no namespaces: RLIMIT_NPROC counts all of the user's processes, and nothing but the
    audit hook keeps the program from signalling or reading the files of processes of the same user.

Not isolated anywhere: CPU and memory bandwidth (a program can slow the machine for `timeout_s`); at the
kernel level, the process list and command lines in /proc, world-writable directories such as /tmp and
/dev/shm (writable as uid 65534), and device files such as /dev/nvidia* (all blocked only by the audit
hook); disk space: `max_file_bytes` bounds each file, not their number, while the program runs (the temp
dir is removed after). Windows is not supported.

How tests are judged (reward hacking)
-------------------------------------
A test run inside the program's interpreter could be fooled: `assert add(1, 2) == 3` passes if add returns
an object whose __eq__ always says True. So the comparison is not made there. The parent splits each
top-level `assert` (see _plan_test): the child evaluates only the sub-expressions whose values come from the
program ("leaves": `add(1, 2)`, `s.pop()`, `len(stack)`, `[f(i) for i in range(3)]`) and sends each value
back as plain data, and the parent evaluates the rest of the assert (==, !=, <, in, is, and/or/not, + - * /,
abs, len, sorted, round, isinstance, type, math.isclose, ...) on those values itself.

  - Plain data: None, bool, int, float, complex, str, bytes, and list, tuple, dict, set, frozenset of plain
    data, read by exact type without calling any of the program's code (its __eq__, __bool__, __hash__,
    __repr__ never run). Also accepted, as their plain equivalents: collections.Counter, OrderedDict,
    defaultdict (dict), namedtuples (tuple), dict.keys()/items() views (frozenset). Refused, with a reason
    naming the value: objects of the program's own classes, subclasses of int, str, list... (`class I(int)`),
    generators, and anything nested deeper than 40 levels or larger than 1 MB encoded.
  - Equality is type-strict: numbers compare by value (1 == 1.0 == 1+0j), but a bool is not a number
    (True != 1), str != bytes, list != tuple, set == frozenset, and so on all the way down. `is None`,
    `is True` work; a truth test (`assert is_prime(7)`) needs a plain value.
  - The expected values (`3` above) never enter the program's process, and the child's harness binds what it
    uses before the program runs (builtins, this module's functions): monkey-patching builtins, __main__,
    AssertionError or sys.excepthook changes nothing, and sys.exit / os._exit stop the run with the tests
    that have passed so far. A program that walks stack frames into the harness can still write result
    lines, but all it can forge is the value of a leaf, which it controls anyway.

Limits (each such test fails, with a reason saying what to write instead): only the top level of an assert
is judged outside, so a comparison, and/or/not, a condition, a comprehension filter or a call such as all(),
isinstance(), operator.eq() inside a leaf or inside the test's other statements (`if f(1) != 2: raise`,
`assert g(f(x) == 3)`, `assert all(f(x) == y for ...)`, an assert inside a for loop or a `def check()`) is
refused. Write one top-level assert per check, or compare whole lists: `assert [f(x) for x in xs] == ys`.
Operations of the test on an object of the program's own class run in the sandbox where they are the
program's answer (method calls and attribute reads `s.pop()`, `p.x`, and len, list, sorted, str, sum, min,
max... of it); the rest (indexing `s[0]`, arithmetic, ==) need a plain value. Function calls made inside a
leaf are the program's business: a test that asks `f(x).count(3)` gets whatever count the program's object
reports, unless it is a builtin list, tuple, dict or set, whose comparing methods run only on plain data.
Each assert's leaves are all evaluated, left to right, before the parent judges it (no short-circuit).
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import operator
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace

if __name__ != "__main__":
    # Parent-only modules. The child runs this file as a script and must not hold subprocess (whose
    # _posixsubprocess.fork_exec is not audited) where the program could reach it through __main__.
    import secrets
    import selectors
    import shutil
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor


# Standard-library modules imported before the child drops privileges: after the drop the interpreter's
# files may be unreadable to sandbox_uid (e.g. a pyenv under /root); then a program can import only these.
PREIMPORT = ("abc", "array", "base64", "bisect", "calendar", "cmath", "collections", "contextlib", "copy",
             "dataclasses", "datetime", "decimal", "encodings.idna", "enum", "fractions", "functools",
             "glob", "hashlib", "heapq", "itertools", "json", "math", "numbers", "operator", "pprint",
             "queue", "random", "re", "shutil", "socket", "statistics", "string", "struct", "textwrap",
             "threading", "time", "traceback", "typing", "unicodedata", "warnings", "weakref")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 3.0
    """Wall-clock limit per program, enforced by the parent (kill the process group). Usual 1-10 s."""
    cpu_s: int = 2
    """RLIMIT_CPU seconds (SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = 512
    """RLIMIT_AS: address space of the program; a larger allocation raises MemoryError. >= 128."""
    max_output_bytes: int = 64_000
    """stdout+stderr kept; a program printing more is killed and scores 0."""
    max_file_bytes: int = 1_000_000
    """RLIMIT_FSIZE: largest file the program may write (in its temp dir)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_processes: int = 32
    """RLIMIT_NPROC, processes+threads of the program's uid; ignored by the kernel for root."""
    sandbox_uid: int | None = 65534
    """uid/gid the child switches to when the parent is root (65534 = nobody); None keeps root."""
    namespaces: bool = True
    """Try network + PID namespaces (Linux unshare(2)); silently skipped where refused."""
    audit_hook: bool = True
    """Install the Python audit hook (defense in depth). Turn off only to test the kernel layers."""
    preimport: tuple[str, ...] = PREIMPORT
    """Modules loaded before the privilege drop (the only ones importable afterwards as uid 65534)."""

    def __post_init__(self):
        for name, low in [("timeout_s", 0.05), ("cpu_s", 1), ("memory_mb", 128), ("max_output_bytes", 1),
                          ("max_file_bytes", 0), ("max_open_files", 16), ("max_processes", 1)]:
            if getattr(self, name) < low:
                raise ValueError(f"SandboxLimits.{name}={getattr(self, name)!r} is too small; use >= {low}"
                                 + (" (the interpreter itself needs ~100 MB of address space)"
                                    if name == "memory_mb" else ""))


@dataclass
class SandboxResult:
    passed: int
    """Tests whose statements ran without raising and whose asserts held (judged on plain values)."""
    total: int
    """Number of tests."""
    reason: str
    """Why: 'ok: 3/3 tests passed', 'solution raised ...', 'wall-clock time limit ...', '1/3 tests failed;
    first: test 2: result of add(1, 2) is A, not a plain value (a custom __eq__ could fake equality)', ..."""
    output: str = ""
    """Beginning of the program's stdout+stderr (at most max_output_bytes)."""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    isolation: tuple[str, ...] = field(default_factory=tuple)
    """Layers that engaged, e.g. ('session', 'rlimits', 'netns', 'pidns', 'uid=65534', 'audit_hook')."""

    @property
    def fraction(self) -> float:
        """passed / total (0.0 when there are no tests)."""
        return self.passed / self.total if self.total else 0.0


# ----------------------------------------------------------------------------------------------
# parent: start one program, read its pipes with caps, kill its process group, summarize
# ----------------------------------------------------------------------------------------------

_RESULT_CAP = 8_000_000  # bytes accepted on the result pipe (the tests' values travel on it)
_EXIT_GRACE_S = 1.0  # after both pipes closed, how long a program may take to exit before it is killed


def run_untrusted(code: str, tests: list[str], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code`, then each test in its namespace, in a confined child process.

    Never raises for anything the program does and never waits past limits.timeout_s (+ ~0.1 s);
    a failure of the harness itself comes back as passed=0 with reason 'harness error: ...'.
    """
    limits = limits or SandboxLimits()
    tests = [str(t) for t in tests]
    start = time.monotonic()
    workdir = None
    try:
        workdir, uid = _make_workdir(limits)
        result = _run_in(workdir, uid, code, tests, limits)
    except TimeoutError:  # the trainer's reward timeout (SIGALRM in rewards.py) must reach the trainer
        raise
    except Exception as e:  # the training loop must survive anything else here
        result = SandboxResult(0, len(tests), f"harness error: {type(e).__name__}: {e}")
    finally:
        if workdir is not None:
            _remove_workdir(workdir)
    result.wall_s = time.monotonic() - start
    return result


def run_many(jobs, limits: SandboxLimits | None = None, max_workers: int | None = None,
             deadline_s: float | None = None) -> list[SandboxResult]:
    """run_untrusted over [(code, tests), ...] with at most `max_workers` programs at once (threads that
    each wait on one child process). With `deadline_s`, each program's wall limit is cut to the time left
    and programs that would start after the deadline are not run (passed=0, reason says so), so the call
    returns within about deadline_s + 0.2 s. Results are in the order of `jobs`."""
    limits = limits or SandboxLimits()
    jobs = list(jobs)
    end = None if deadline_s is None else time.monotonic() + deadline_s

    def run_one(job) -> SandboxResult:
        code, tests = job
        if end is None:
            return run_untrusted(code, tests, limits)
        left = end - time.monotonic()
        if left < 0.05:
            return SandboxResult(0, len(tests), f"not run: batch time budget deadline_s={deadline_s:g} s used up "
                                                f"(raise it or max_workers)")
        return run_untrusted(code, tests, replace(limits, timeout_s=min(limits.timeout_s, left)))

    pool = ThreadPoolExecutor(max_workers=max_workers or default_workers(), thread_name_prefix="sandbox")
    try:
        return list(pool.map(run_one, jobs))
    finally:
        # interrupted (e.g. by the trainer's reward timeout): drop queued programs, wait for running ones,
        # each of which ends within its own wall limit
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Programs run at once by default: one per CPU core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _make_workdir(limits: SandboxLimits) -> tuple[str, int | None]:
    """A fresh temp dir (mode 0700) owned by the uid the child will drop to; that uid is None when we are
    not root, or when it cannot own files here (e.g. unmapped in a rootless container)."""
    workdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
    uid = limits.sandbox_uid if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    if uid is not None:
        try:
            os.chown(workdir, uid, uid)
        except OSError:
            uid = None
    return workdir, uid


def _remove_workdir(workdir: str) -> None:
    # make every directory writable first: a program running as our uid may have chmod-ed one to 000
    for root, dirs, _ in os.walk(workdir):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(workdir, ignore_errors=True)


def _child_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing from the trainer's (API keys, tokens) is passed on."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _run_in(workdir: str, uid: int | None, code: str, tests: list[str], limits: SandboxLimits) -> SandboxResult:
    """1) write the payload, 2) start the child, 3) read its pipes until done, the deadline or the output cap,
    4) kill its process group, 5) summarize what it reported."""
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    try:
        plans = [_plan_test(t) for t in tests]
        payload = {"code": code, "tests": [p.steps for p in plans], "nonce": nonce, "result_fd": result_w,
                   "workdir": workdir, "uid": uid, "limits": asdict(limits)}
        payload_path = os.path.join(workdir, ".payload.json")
        with open(os.open(payload_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(payload, f)
        deadline = time.monotonic() + limits.timeout_s
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--child", payload_path],
                cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=(result_w,), start_new_session=True)
        finally:
            os.close(result_w)  # else the result pipe never reports end-of-file
        out, res, stop = b"", b"", "harness"
        try:
            out, res, stop = _collect(proc.stdout.fileno(), result_r, deadline, limits.max_output_bytes)
        finally:
            # both pipes closed: the program is exiting; give it a moment (within the deadline) so that its
            # own exit status is kept
            exit_code, cpu_s = _stop(proc, min(time.monotonic() + _EXIT_GRACE_S, deadline) if stop is None else 0)
        return _summarize(_parse_events(res, nonce), stop, exit_code, cpu_s, plans, limits, out)
    finally:
        os.close(result_r)


def _collect(out_fd: int, res_fd: int, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Read the output and result pipes until both close. Stops early with 'timeout' at the deadline or
    'output' past the cap ('results' past _RESULT_CAP on the result pipe); memory use stays below
    cap + _RESULT_CAP whatever the program prints."""
    bufs = {out_fd: bytearray(), res_fd: bytearray()}
    caps = {out_fd: cap, res_fd: _RESULT_CAP}
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(bufs[out_fd]), bytes(bufs[res_fd]), "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk[: caps[key.fd] + 1 - len(bufs[key.fd])]
                if len(bufs[key.fd]) > caps[key.fd]:
                    return bytes(bufs[out_fd][:cap]), bytes(bufs[res_fd]), "output" if key.fd == out_fd else "results"
    return bytes(bufs[out_fd]), bytes(bufs[res_fd]), None


def _stop(proc, wait_until: float) -> tuple[int, float]:
    """Wait until `wait_until` (time.monotonic) for the program to exit, kill its process group, reap it;
    return (exit code, CPU seconds). Exit code -N or 128+N: killed by signal N.

    The group is killed before the leader is reaped: while the leader is an unreaped zombie its pid, and so
    the group id, cannot be taken by an unrelated process."""
    pid = proc.pid
    while time.monotonic() < wait_until and _running(pid):
        time.sleep(0.005)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status, usage = os.wait4(pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _running(pid: int) -> bool:
    """True while `pid` has not exited; does not reap it (WNOWAIT). Without waitid (macOS): False, so the
    program is killed at once and an exit by signal may be reported as SIGKILL."""
    if not hasattr(os, "waitid"):
        return False
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def _parse_events(raw: bytes, nonce: str) -> list[list[str]]:
    """Result lines are '<nonce> <event> <fields...>'; lines without this run's nonce are ignored."""
    prefix = nonce + " "
    lines = raw.decode("utf-8", "replace").split("\n")
    return [line[len(prefix):].split(" ", 3) for line in lines if line.startswith(prefix)]


def _summarize(events, stop, exit_code, cpu_s, plans, limits, out) -> SandboxResult:
    total = len(plans)
    ran, raised, values, solution_error, done, layers = set(), {}, {}, None, False, ()
    for e in events:
        i = _index(e[1]) if len(e) > 2 else None
        if e[0] == "isolation" and len(e) > 1:
            layers = tuple(x for x in " ".join(e[1:]).split(",") if x)
        elif e[0] == "solution" and len(e) > 1 and e[1] == "0":
            solution_error = " ".join(e[2:])
        elif e[0] == "test" and i is not None and i < total:
            if e[2] == "1":
                ran.add(i)
            else:
                raised.setdefault(i, " ".join(e[3:]))
        elif e[0] == "value" and i is not None and i < total and len(e) == 4 and e[3]:
            j = _index(e[2])
            if j is not None and j < len(plans[i].texts):
                values.setdefault(i, {}).setdefault(j, e[3])  # the first report of a value counts
        elif e[0] == "done":
            done = True
    n, first_failure = 0, None
    for i, plan in enumerate(plans):
        if plan.error is not None:
            why = plan.error
        elif i in raised:
            why = raised[i]
        elif i not in ran:
            continue  # the program stopped before this test (the reason says how)
        else:
            why = _judge(plan, values.get(i, {}))
            if why is None:
                n += 1
                continue
        if first_failure is None:
            first_failure = f"test {i}: {why}"
    if stop == "timeout":
        reason = f"wall-clock time limit: killed after {limits.timeout_s:.3g} s"
    elif stop == "output":
        reason = f"output limit: printed more than {limits.max_output_bytes} bytes"
    elif stop == "results":
        reason = f"result limit: the values sent back for the tests exceeded {_RESULT_CAP} bytes"
    elif solution_error is not None:
        reason = f"solution raised {solution_error}"
    elif not done:
        reason = _describe_exit(exit_code, cpu_s, limits, out)
    elif n == total:
        reason = f"ok: {n}/{total} tests passed"
    else:
        reason = f"{total - n}/{total} tests failed; first: {first_failure}"
    return SandboxResult(n, total, reason, out.decode("utf-8", "replace"), cpu_s=cpu_s, isolation=layers)


def _index(field: str) -> int | None:
    return int(field) if field.isascii() and field.isdigit() and len(field) < 9 else None


def _describe_exit(code: int, cpu_s: float, limits: SandboxLimits, out: bytes) -> str:
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s):
        return f"CPU time limit: used {cpu_s:.1f} s of cpu_s={limits.cpu_s}"
    if sig:
        return f"killed by {signal.Signals(sig).name} before the tests finished"
    tail = out.decode("utf-8", "replace").strip()[-200:]
    return f"exited with code {code} before the tests finished" + (f": {tail}" if tail else "")


# ----------------------------------------------------------------------------------------------
# parent: plan each test, then judge it on the plain values the program's process sent back
# ----------------------------------------------------------------------------------------------
#
# `assert add(1, 2) == 3` is split in two. The sandbox evaluates only `add(1, 2)` (a "leaf": a sub-expression
# whose value comes from the program) and sends its value back as plain data: int, float, complex, str,
# bytes, bool, None and list, tuple, dict, set, frozenset of those, exact types only, read without running
# any of the program's code (so a custom __eq__, __bool__, __hash__ or __repr__ is never called, and a
# subclass of int, str, list... is refused). This process then computes `== 3` itself. Anything else
# (an object of the program's own class, a generator, an int subclass) cannot take part in the test: the
# test fails, and the reason names the value.

_MAX_DEPTH = 40  # containers nested deeper are not plain values
_MAX_VALUE_CHARS = 1_000_000  # one value, encoded; larger ones are refused
_MAX_ITEMS = 1_000_000  # largest sequence or range the judge builds
_MAX_INT_BITS = 1_000_000  # largest int the judge computes with ** or <<

# names a test may use in the judged part of an assert: builtins, which the judge runs itself on plain values
_SAFE_CALLS = ("abs", "all", "any", "bin", "bool", "chr", "complex", "dict", "divmod", "enumerate", "float",
               "frozenset", "hex", "int", "isinstance", "len", "list", "max", "min", "oct", "ord", "pow", "range",
               "repr", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "type", "zip")
_SAFE_NAMES = _SAFE_CALLS + ("bytes", "slice")
# applied to a leaf, these run in the sandbox as part of it: len(stack), list(generator), str(obj) are the
# program's answers (its __len__, __iter__, __str__), not judgements. Their result must be plain.
_VIEW_CALLS = frozenset({"len", "list", "tuple", "sorted", "set", "frozenset", "dict", "str", "repr", "sum", "min",
                         "max", "enumerate", "zip", "reversed"})
# calls that judge (truth, type tests, comparisons): never inside a leaf, where the program's objects could
# answer them. Names of builtins, and of methods or module functions (operator.eq, numpy.allclose).
_JUDGE_CALLS = frozenset({"all", "any", "bool", "filter", "isinstance", "issubclass", "callable", "hasattr"})
_JUDGE_METHODS = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "contains", "truth", "not_", "is_", "is_not",
                            "countOf", "indexOf", "isclose", "allclose", "array_equal", "__eq__", "__ne__", "__lt__",
                            "__le__", "__gt__", "__ge__", "__contains__", "__bool__"})
_MATH_CONSTANTS = frozenset({"pi", "e", "tau", "inf", "nan"})
_MATH_CALLS = frozenset({"isclose", "sqrt", "isqrt", "floor", "ceil", "trunc", "fabs", "exp", "expm1", "log", "log2",
                         "log10", "log1p", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh",
                         "tanh", "hypot", "degrees", "radians", "gcd", "fsum", "isnan", "isinf", "isfinite",
                         "copysign", "fmod", "modf", "frexp", "ldexp", "dist", "remainder"})
_METHOD_GUARD = "__sandbox_method__"  # name of the guard for method calls inside leaves (see _make_method_guard)

_WHY_EQ = "a custom __eq__ could fake equality"
_WHY_ORDER = "a custom __lt__ could fake the order"
_WHY_IN = "a custom __eq__ or __contains__ could fake membership"
_WHY_BOOL = "a custom __bool__ could fake the truth"
_WHY_OP = "its own operators could fake the result"


class _Unsupported(Exception):
    """The test has a form the parent cannot judge (raised while planning)."""


class _Fail(Exception):
    """The test fails; the message is the reason."""


@dataclass
class _Plan:
    steps: list | None = None
    """For the child: ["exec", source] | ["eval", [[leaf index, source], ...]], in the order to run them."""
    checks: list = field(default_factory=list)
    """(assert test expression node, message or None) judged here, in order."""
    leaf_of: dict = field(default_factory=dict)
    """id(node) -> leaf index, for the nodes the child evaluates."""
    texts: list = field(default_factory=list)
    """leaf index -> the leaf as the test wrote it, for reasons."""
    sources: list = field(default_factory=list)
    """leaf index -> what the child evaluates (method calls guarded, see _Guard)."""
    tree: object = None
    """The parsed test: keeps the nodes (whose ids leaf_of holds) alive."""
    shadowed: frozenset = frozenset()
    """Names the test's own statements bind (`max = 5`): not the builtins of that name for the judge."""
    error: str | None = None
    """Why the test cannot be judged (it then fails without running)."""


def _plan_test(source: str) -> _Plan:
    """Split a test into statements the child runs as they are and asserts the parent judges."""
    try:
        tree = ast.parse(source, "<test>")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return _Plan(error=_describe_exception(e))
    plan, pending = _Plan(steps=[], tree=tree), []
    plan.shadowed = frozenset(_bound_names([s for s in tree.body if not isinstance(s, ast.Assert)]))
    try:
        for stmt in tree.body:
            if not isinstance(stmt, ast.Assert):
                nested = next((n for n in ast.walk(stmt) if isinstance(n, ast.Assert)), None)
                if nested is not None:
                    raise _Unsupported(f"an assert inside a {type(stmt).__name__} statement (line {nested.lineno}) "
                                       f"cannot be judged outside the program's process; write each check as a "
                                       f"top-level assert")
                _refuse_judgement(stmt, f"`{_short(stmt)}`")
                pending.append(_Guard().visit(stmt))
                continue
            if pending:
                plan.steps.append(["exec", ast.unparse(ast.Module(body=pending, type_ignores=[]))])
                pending = []
            first = len(plan.texts)
            _plan_expr(stmt.test, plan)
            if len(plan.texts) > first:
                plan.steps.append(["eval", [[j, plan.sources[j]] for j in range(first, len(plan.texts))]])
            msg = stmt.msg.value if isinstance(stmt.msg, ast.Constant) and isinstance(stmt.msg.value, str) else None
            plan.checks.append((stmt.test, msg))
        if pending:
            plan.steps.append(["exec", ast.unparse(ast.Module(body=pending, type_ignores=[]))])
    except _Unsupported as e:
        return _Plan(error=str(e))
    except Exception as e:  # RecursionError on a deeply nested test, ast.unparse giving up on an f-string
        return _Plan(error=f"the test could not be prepared for judging: {_describe_exception(e)}")
    return plan


def _bound_names(statements: list) -> set:
    """Names that statements bind (assignments, def, class, for targets, imports other than `import math`)."""
    names = set()
    for n in (x for stmt in statements for x in ast.walk(stmt)):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names
                         if not (isinstance(n, ast.Import) and a.name == "math" and a.asname in (None, "math")))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            names.update(n.names)
    return names


def _short(node: ast.AST, n: int = 80) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_judged_here(node: ast.expr, shadowed: frozenset = frozenset()) -> bool:
    """True for the node types the parent evaluates itself; every other sub-expression is a leaf."""
    if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp, ast.BoolOp,
                         ast.Compare, ast.IfExp, ast.Slice, ast.Subscript, ast.Starred)):
        return True
    if isinstance(node, ast.Name):
        return node.id not in shadowed and (node.id in _SAFE_NAMES or node.id == "math")
    if isinstance(node, ast.Attribute):
        return (isinstance(node.value, ast.Name) and node.value.id == "math" and "math" not in shadowed
                and node.attr in _MATH_CONSTANTS | _MATH_CALLS)
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute):
            return (isinstance(f.value, ast.Name) and f.value.id == "math" and "math" not in shadowed
                    and f.attr in _MATH_CALLS)
        if not (isinstance(f, ast.Name) and f.id in _SAFE_CALLS and f.id not in shadowed):
            return False
        if f.id in _VIEW_CALLS:  # len(stack), list(gen()): the program's answer, evaluated with the leaf
            args = [a.value if isinstance(a, ast.Starred) else a for a in node.args] + [k.value for k in node.keywords]
            return all(_is_judged_here(a, shadowed) for a in args)
        return True
    return False


def _children(node: ast.AST) -> list:
    """Sub-expressions in the order Python evaluates them."""
    if isinstance(node, ast.Dict):
        return [x for k, v in zip(node.keys, node.values) for x in (k, v) if x is not None]
    if isinstance(node, ast.Call):
        return [node.func, *node.args, *[k.value for k in node.keywords]]
    return [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]


def _plan_expr(node: ast.expr, plan: _Plan, iterated: bool = False) -> None:
    """Walk the judged part of an assert; make each other sub-expression a leaf. `iterated`: the judge only
    iterates this value (all(x), any(x)), so the child may send list(x) for a generator or map object."""
    if _is_judged_here(node, plan.shadowed):
        iterate = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("all", "any")
        for child in _children(node):
            if not (isinstance(node, ast.Call) and child is node.func):
                _plan_expr(child, plan, iterate and child in node.args)
        return
    _refuse_judgement(node, f"`{_short(node)}`")
    leaf = _Guard().visit(ast.fix_missing_locations(_copy_node(node)))
    if isinstance(leaf, ast.GeneratorExp):  # all(is_prime(p) for p in ps): send the values, not a generator
        leaf = ast.ListComp(elt=leaf.elt, generators=leaf.generators)
    elif iterated and "list" not in plan.shadowed:  # all(map(is_prime, ps))
        leaf = ast.Call(func=ast.Name(id="list", ctx=ast.Load()), args=[leaf], keywords=[])
    plan.leaf_of[id(node)] = len(plan.texts)
    plan.texts.append(_short(node))
    plan.sources.append(ast.unparse(leaf))


def _copy_node(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node), mode="eval").body


def _refuse_judgement(node: ast.AST, where: str) -> None:
    """A comparison, truth test or type test that would run in the program's process, where the program's
    objects could answer it, makes the test unjudgeable: raise _Unsupported saying so."""
    for n in ast.walk(node):
        what = None
        if isinstance(n, ast.Compare):
            what = "a comparison"
        elif isinstance(n, ast.BoolOp) or (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not)):
            what = "and/or/not"
        elif isinstance(n, (ast.If, ast.IfExp, ast.While, ast.Match)):
            what = "a condition"
        elif isinstance(n, ast.comprehension) and n.ifs:
            what = "a comprehension filter"
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _JUDGE_CALLS:
            what = f"{n.func.id}()"
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _JUDGE_METHODS:
            what = f".{n.func.attr}()"
        if what is not None:
            raise _Unsupported(f"{what} in {where} would run in the program's process, where the program's "
                               f"objects could fake it; only the top level of an assert is judged outside "
                               f"(`assert f(x) == y` is, `assert g(f(x) == y)` is not)")


def _judge(plan: _Plan, raw_values: dict) -> str | None:
    """None if every assert of the test holds on the values sent back, else the reason it fails."""
    judge = _Judge(plan, raw_values)
    for test, msg in plan.checks:
        try:
            if not judge.truth(judge.value(test)):
                return "AssertionError" + (f": {msg}" if msg else "")
        except _Fail as e:
            return str(e)
        except TimeoutError:
            raise
        except Exception as e:  # what Python would raise evaluating the assert on these values
            return _describe_exception(e)
    return None


class _Opaque:
    """Stands for a value that is not plain. Any use other than `is` fails the test with a reason."""

    __slots__ = ("text", "desc", "limit")

    def __init__(self, text: str, desc: str, limit: bool = False):
        self.text, self.desc, self.limit = text, desc, limit

    def refuse(self, why: str = _WHY_OP):
        if self.limit:
            raise _Fail(f"result of {self.text} could not be sent back: {self.desc}")
        raise _Fail(f"result of {self.text} is {self.desc}, not a plain value ({why})")

    def __eq__(self, other):
        self.refuse(_WHY_EQ)

    __hash__ = object.__hash__


def _opaque_refuses(name: str):
    def method(self, *args):
        self.refuse()

    method.__name__ = name
    return method


for _dunder in ("__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__iter__", "__contains__",
                "__getitem__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                "__rtruediv__", "__floordiv__", "__mod__", "__pow__", "__neg__", "__abs__", "__index__", "__int__",
                "__float__", "__complex__", "__round__", "__str__", "__repr__", "__format__"):
    setattr(_Opaque, _dunder, _opaque_refuses(_dunder))
del _dunder


class _Guard(ast.NodeTransformer):
    """Inside a leaf, `x.m(args)` becomes `__sandbox_method__(x, 'm', args)`: on a list, tuple, dict or set,
    methods that compare (count, index, get, ...) run only when the container and the arguments are plain."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute):
            return ast.Call(func=ast.Name(id=_METHOD_GUARD, ctx=ast.Load()),
                            args=[f.value, ast.Constant(value=f.attr), *node.args], keywords=node.keywords)
        return node


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
           ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.BitAnd: operator.and_}
_UNARYOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}


class _Judge:
    """Evaluates the judged part of an assert: builtins and operators on plain values, with type-strict
    equality (see _canon). Values of leaves come from the child; nothing here runs the program's code."""

    def __init__(self, plan: _Plan, raw_values: dict):
        self.plan, self.raw = plan, raw_values

    def value(self, node: ast.expr):
        j = self.plan.leaf_of.get(id(node))
        if j is not None:
            return self.leaf(j)
        return getattr(self, "_" + type(node).__name__)(node)

    def leaf(self, j: int):
        raw, text = self.raw.get(j), self.plan.texts[j]
        if raw is None:
            raise _Fail(f"no value came back for {text}")
        if raw[0] == "!":  # it raised: the test fails as `assert` would have
            raise _Fail(raw[1:])
        if raw[0] in "?#":
            return _Opaque(text, raw[1:], limit=raw[0] == "#")
        try:
            return _decode(raw[1:])
        except Exception:
            raise _Fail(f"the value of {text} could not be read back") from None

    def plain(self, v, why: str):
        if isinstance(v, _Opaque):
            v.refuse(why)
        return v

    def truth(self, v) -> bool:
        return bool(self.plain(v, _WHY_BOOL))

    # --- nodes
    def _Constant(self, node):
        return node.value

    def _Name(self, node):
        return math if node.id == "math" else getattr(builtins, node.id)

    def _Attribute(self, node):
        return getattr(math, node.attr)

    def _items(self, nodes) -> list:
        out = []
        for n in nodes:
            if isinstance(n, ast.Starred):
                out.extend(self.iterable(self.value(n.value)))
            else:
                out.append(self.value(n))
        return out

    def iterable(self, v):
        v = self.plain(v, _WHY_OP)
        if isinstance(v, range) and len(v) > _MAX_ITEMS:
            raise _Fail(f"the judge does not expand a range of {len(v)} items")
        return v

    def _Tuple(self, node):
        return tuple(self._items(node.elts))

    def _List(self, node):
        return self._items(node.elts)

    def _Set(self, node):
        return set(self._items(node.elts))

    def _Dict(self, node):
        d = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                d.update(self.plain(self.value(v), _WHY_OP))
            else:
                key = self.plain(self.value(k), _WHY_EQ)
                d[key] = self.value(v)
        return d

    def _UnaryOp(self, node):
        v = self.value(node.operand)
        if isinstance(node.op, ast.Not):
            return not self.truth(v)
        return _UNARYOPS[type(node.op)](self.plain(v, _WHY_OP))

    def _BinOp(self, node):
        a = self.plain(self.value(node.left), _WHY_OP)
        b = self.plain(self.value(node.right), _WHY_OP)
        if type(node.op) not in _BINOPS:
            raise _Fail(f"the judge does not compute {type(node.op).__name__}")
        _check_size(type(node.op), a, b)
        return _BINOPS[type(node.op)](a, b)

    def _BoolOp(self, node):
        v = None
        for e in node.values:
            v = self.value(e)
            if self.truth(v) == isinstance(node.op, ast.Or):
                return v
        return v

    def _Compare(self, node):
        left = self.value(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = self.value(comp)
            if not self.compare(op, left, right):
                return False
            left = right
        return True

    def compare(self, op, a, b) -> bool:
        if isinstance(op, ast.Is):
            return a is b
        if isinstance(op, ast.IsNot):
            return a is not b
        if isinstance(op, (ast.Eq, ast.NotEq)):
            equal = _canon(self.plain(a, _WHY_EQ)) == _canon(self.plain(b, _WHY_EQ))
            return equal if isinstance(op, ast.Eq) else not equal
        if isinstance(op, (ast.In, ast.NotIn)):
            found = _contains(self.plain(b, _WHY_IN), self.plain(a, _WHY_IN))
            return found if isinstance(op, ast.In) else not found
        a, b = self.plain(a, _WHY_ORDER), self.plain(b, _WHY_ORDER)
        return {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}[type(op)](a, b)

    def _IfExp(self, node):
        return self.value(node.body) if self.truth(self.value(node.test)) else self.value(node.orelse)

    def _Subscript(self, node):
        container = self.plain(self.value(node.value), _WHY_OP)
        return container[self.plain(self.value(node.slice), _WHY_OP)]

    def _Slice(self, node):
        parts = [None if n is None else self.plain(self.value(n), _WHY_OP) for n in (node.lower, node.upper, node.step)]
        return slice(*parts)

    def _Call(self, node):
        f = node.func
        fn = getattr(math, f.attr) if isinstance(f, ast.Attribute) else getattr(builtins, f.id)
        args = self._items(node.args)
        kwargs = {}
        for k in node.keywords:
            if k.arg is None:
                kwargs.update(self.plain(self.value(k.value), _WHY_OP))
            else:
                kwargs[k.arg] = self.value(k.value)
        if fn is type:
            if len(args) != 1 or kwargs:
                raise _Fail("the judge calls type() with one argument only")
            return type(args[0])  # type(<not plain>) is _Opaque: `type(f(x)) is int` is False
        why = _WHY_BOOL if fn in (all, any, bool) else _WHY_OP
        args = [self.plain(a, why) for a in args]
        kwargs = {k: self.plain(v, why) for k, v in kwargs.items()}
        if fn is range:
            r = range(*args, **kwargs)
            if len(r) > _MAX_ITEMS:
                raise _Fail(f"the judge does not build a range of {len(r)} items")
            return r
        if fn is pow and len(args) == 2:
            _check_size(ast.Pow, *args)
        for a in args:  # list(range(10**9)), sorted(...): expanding a huge range
            if isinstance(a, range):
                self.iterable(a)
        return fn(*args, **kwargs)


def _check_size(op: type, a, b) -> None:
    """Refuse arithmetic whose result would be huge (the values come from the program)."""
    ints = type(a) in (int, bool) and type(b) in (int, bool)
    if op is ast.Pow and ints and b > 0 and abs(a) > 1 and a.bit_length() * b > _MAX_INT_BITS:
        raise _Fail(f"the judge does not compute a power with more than {_MAX_INT_BITS} bits")
    if op is ast.LShift and ints and b > _MAX_INT_BITS:
        raise _Fail(f"the judge does not shift by more than {_MAX_INT_BITS} bits")
    if op is ast.Mod and isinstance(a, (str, bytes)) and ("*" in a if isinstance(a, str) else b"*" in a):
        raise _Fail("the judge does not format with * widths")  # '%*d' % (10**9, 1): a width from the program
    if op is ast.Mult:
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, list, tuple)) and type(n) is int and len(seq) * n > _MAX_ITEMS:
                raise _Fail(f"the judge does not build a sequence of more than {_MAX_ITEMS} items")


def _canon(v):
    """A key that is equal for equal values, type-strictly: numbers (int, float, complex) compare by value
    (1 == 1.0), but bool is not a number (True != 1), and str, bytes, list, tuple, dict, set (== frozenset)
    and None each equal only their own kind, all the way down."""
    t = type(v)
    if v is None:
        return ("None",)
    if t is bool:
        return ("bool", v)
    if t in (int, float, complex):
        return ("number", v)
    if t in (str, bytes):
        return (t.__name__, v)
    if t in (list, tuple):
        return (t.__name__, tuple(_canon(x) for x in v))
    if t in (set, frozenset):
        return ("set", frozenset(_canon(x) for x in v))
    if t is dict:
        return ("dict", frozenset((_canon(k), _canon(x)) for k, x in v.items()))
    if t is _Opaque:
        v.refuse(_WHY_EQ)
    return ("object", v)  # made by the judge (a type, a range): their own equality is trusted


def _contains(container, item) -> bool:
    """`item in container` with _canon's equality; substrings for str and bytes."""
    if type(container) in (str, bytes):
        return item in container
    if isinstance(container, range) and type(item) in (int, float):
        return item in container
    key = _canon(item)
    return any(_canon(x) == key for x in container)


def _decode(text: str):
    """The child's JSON (see _make_encoder) back to plain values."""
    return _untag(json.loads(text), 0)


def _untag(x, depth: int):
    if depth > _MAX_DEPTH + 1:
        raise ValueError("too deep")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list and len(x) in (2, 3) and type(x[0]) is str:
        tag = x[0]
        if tag == "b" and len(x) == 2:
            return bytes.fromhex(x[1])
        if tag == "c" and len(x) == 3 and all(type(v) in (int, float) for v in x[1:]):
            return complex(x[1], x[2])
        if tag == "D" and len(x) == 2:
            return {_untag(k, depth + 1): _untag(v, depth + 1) for k, v in x[1]}
        make = {"L": list, "T": tuple, "S": set, "F": frozenset}.get(tag)
        if make is not None and len(x) == 2 and type(x[1]) is list:
            return make(_untag(v, depth + 1) for v in x[1])
    raise ValueError(f"not an encoded value: {t.__name__}")


# ----------------------------------------------------------------------------------------------
# child: confine this process, then run the program and the tests
# ----------------------------------------------------------------------------------------------

_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG = 1

_BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.link", "os.symlink",
    "resource.setrlimit", "resource.prlimit", "sys._current_frames", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents",
})
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.")
# modules the program may not (re)load: unaudited process creation, or a fresh copy of deleted functions
_BLOCKED_IMPORTS = frozenset({"_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing",
                              "ctypes", "_ctypes", "posix", "os", "signal", "_signal", "pty"})
# event -> positions of its arguments that are paths it creates, changes or deletes
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
                "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,),
                "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.chown": (0,), "shutil.move": (0, 1),
                "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.make_archive": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DEVICES = ("/dev/null", "/dev/urandom", "/dev/zero")


def _child_main(payload_path: str) -> None:
    """Entry point of the child: confine, run the code, then each test's statements and leaves (see
    _plan_test), reporting on the result pipe: 'test i 1|0', 'value i j =<plain>|?<why not>|!<exception>'."""
    # Everything used after the program starts is bound here, before it runs: the program may replace
    # builtins (exec, str, type), module attributes, or this module's own functions (import __main__).
    # A program that walks stack frames into this function can still write result lines, but all it can
    # forge is the value of a leaf, which it controls anyway: the verdicts are computed by the parent.
    _exec, _compile, _eval, _exit, _dict, _enumerate = exec, compile, eval, os._exit, dict, enumerate
    _str, _type, _BaseException = str, type, BaseException
    run_step, flush, guard_name = _run_step, _flush, _METHOD_GUARD
    with open(payload_path) as f:
        p = json.load(f)
    os.remove(payload_path)  # the nonce must not stay readable by the program
    code, tests = p["code"], tuple(p["tests"])
    emit = _event_writer(p["result_fd"], p["nonce"])
    encode, describe = _make_encoder(), _make_describer()
    method_guard = _make_method_guard(encode)
    layers = _confine(p)
    emit("isolation", ",".join(layers))
    import builtins

    builtin_items = tuple(vars(builtins).items())  # tests see the builtins as they were before the program
    ns = {"__name__": "solution", "__builtins__": builtins}
    streams = (sys.stdout, sys.stderr)  # the program may replace sys.stdout; flush what it printed
    if not run_step(emit, "solution", code, "solution.py", ns, _exec, _compile, describe):
        _exit(flush(streams))
    for i, steps in _enumerate(tests):
        if steps is None:  # the parent refused this test; it fails without running
            continue
        clean = _dict(builtin_items)
        # names the program defines may not shadow builtins the test uses (type, isinstance, ...)
        test_ns = {k: v for k, v in ns.items() if _type(k) is _str and k not in clean}
        test_ns["__builtins__"] = clean
        test_ns[guard_name] = method_guard
        label, index, filename, ok = "test " + _str(i), _str(i), "test_" + _str(i) + ".py", True
        for kind, body in steps:
            if kind == "exec":
                if not run_step(emit, label, body, filename, test_ns, _exec, _compile, describe, quiet=True):
                    ok = False
                    break
                continue
            for j, source in body:  # the leaves of one assert: their values go back, the parent judges
                try:
                    value = _eval(_compile(source, filename, "eval"), test_ns)
                except _BaseException as e:
                    emit("value", index, _str(j), "!" + describe(e))
                    continue
                emit("value", index, _str(j), encode(value))
        if ok:
            emit(label, "1")
    emit("done")
    _exit(flush(streams))


def _flush(streams) -> int:
    """Flush the program's output before os._exit (which skips it); return exit code 0."""
    for stream in streams:
        try:
            stream.flush()
        except BaseException:  # closed or replaced by the program
            pass
    return 0


def _event_writer(fd: int, nonce: str):
    write, _OSError = os.write, OSError

    def emit(*fields: str) -> None:
        line = (nonce + " " + " ".join(fields).replace("\n", " ") + "\n").encode("utf-8", "backslashreplace")
        try:
            write(fd, line)
        except _OSError:  # the program closed the pipe: its results are lost and it scores 0
            pass

    return emit


def _run_step(emit, label: str, source: str, filename: str, ns: dict, _exec, _compile, describe,
              quiet: bool = False) -> bool:
    """Run `source` in `ns`; report 'label 0 <exception>', or unless quiet 'label 1'."""
    try:
        _exec(_compile(source, filename, "exec"), ns)
    except BaseException as e:  # anything raised, SystemExit included, fails this step
        emit(label, "0", describe(e))
        return False
    if not quiet:
        emit(label, "1")
    return True


def _describe_exception(e: BaseException) -> str:
    try:
        msg = str(e)
    except BaseException:  # a hostile __str__
        msg = "<unprintable>"
    return (type(e).__name__ + (f": {msg}" if msg else ""))[:300]


def _make_describer():
    """_describe_exception with its builtins bound before the program runs (it may replace str or type)."""
    _str, _type, _BaseException = str, type, BaseException
    _name, _copy = type.__dict__["__name__"].__get__, str.__str__  # the real type name; an exact str

    def describe(e) -> str:
        try:
            msg = _copy(_str(e))
        except _BaseException:  # a hostile __str__
            msg = "<unprintable>"
        name = _name(_type(e))
        return (name + ": " + msg if msg else name)[:300]

    return describe


# methods of list, tuple, dict, set and frozenset that compare or hash their arguments or elements
_COMPARING_METHODS = frozenset({
    "count", "index", "remove", "sort", "get", "pop", "setdefault", "fromkeys", "add", "discard", "union",
    "intersection", "difference", "symmetric_difference", "issubset", "issuperset", "isdisjoint", "update",
    "intersection_update", "difference_update", "symmetric_difference_update"})


def _make_encoder():
    """encode(value) -> '=' + JSON of a tagged tree of exact builtins (see _untag), or '?' + what the value is
    when it is not plain, or '#' + why it cannot be sent (size, depth). Bound before the program runs, and it
    never calls the program's code: every value is read by its exact type (type(x) is int, ...), through the
    builtin types' own C methods.

    Plain: None, bool, int, float, complex, str, bytes, and list, tuple, dict, set, frozenset of plain values.
    Also read as their plain equivalents: collections.OrderedDict, defaultdict and Counter (as dict),
    namedtuple instances (as tuple), dict.keys() and dict.items() views (as frozenset), each through the
    builtin base type's C methods, so any method their class overrides is ignored. Anything else is refused:
    an object of the program's own class, a subclass of int, str, list..., a generator."""
    _type, _repr, _len, _enumerate, _BaseException, _ValueError = type, repr, len, enumerate, BaseException, ValueError
    _bool, _int, _float, _complex, _str, _bytes = bool, int, float, complex, str, bytes
    _list, _tuple, _dict, _set, _frozenset = list, tuple, dict, set, frozenset
    _mro, _name = type.__dict__["__mro__"].__get__, type.__dict__["__name__"].__get__
    _own = type.__dict__["__dict__"].__get__
    _hex, _dict_items, _tuple_iter = bytes.hex, dict.items, tuple.__iter__
    _real, _imag = complex.__dict__["real"].__get__, complex.__dict__["imag"].__get__
    # the encoder only ever sees the exact builtins walk() returns; NaN and Infinity pass as JSON extensions
    dumps = json.JSONEncoder(check_circular=False, separators=(",", ":")).encode
    colls = sys.modules.get("collections")
    dict_like = (colls.OrderedDict, colls.defaultdict, colls.Counter) if colls is not None else ()
    views = (_type({}.keys()), _type({}.items()))
    bases = (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
    max_depth, max_chars, max_items = _MAX_DEPTH, _MAX_VALUE_CHARS, _MAX_VALUE_CHARS // 2
    items_seen = [0]

    class NotPlain(Exception):
        pass

    def one_of(t, types) -> bool:  # `t in types` could call a metaclass's __eq__
        for x in types:
            if t is x:
                return True
        return False

    def describe(t) -> str:
        for m in _mro(t)[1:]:
            if one_of(m, bases):
                return f"{_name(t)} (a subclass of {_name(m)})"
        return _name(t)

    def walk(x, depth: int):
        t = _type(x)
        if x is None or t is _bool or t is _int or t is _str or t is _float:
            return x
        if t is _bytes:
            return ["b", _hex(x)]
        if t is _complex:
            return ["c", _real(x), _imag(x)]
        if depth >= max_depth:
            raise NotPlain(f"containers nested more than {max_depth} deep", "", False, True)
        if t is _dict or one_of(t, dict_like):
            pairs = _list(_dict_items(x))
            items_seen[0] += _len(pairs)
            if items_seen[0] > max_items:
                raise NotPlain("too large to send", "", False, True)
            out = []
            for k, v in pairs:
                try:
                    key = walk(k, depth + 1)
                except NotPlain as e:
                    raise NotPlain(e.args[0], e.args[1], True, e.args[3]) from None
                try:
                    out.append([key, walk(v, depth + 1)])
                except NotPlain as e:
                    where = f"[{_repr(k)[:40]}]" if _type(k) is _str or _type(k) is _int else "[...]"
                    raise NotPlain(e.args[0], where + e.args[1], True, e.args[3]) from None
            return ["D", out]
        if t is _list:
            tag, items = "L", x
        elif t is _tuple:
            tag, items = "T", x
        elif t is _set or t is _frozenset or one_of(t, views):
            tag, items = ("S" if t is _set else "F"), x
        elif _len(_mro(t)) > 1 and _mro(t)[1] is _tuple and "_fields" in _own(t):  # a namedtuple: its items
            tag, items = "T", _list(_tuple_iter(x))
        else:
            raise NotPlain(describe(t), "", False, False)
        items_seen[0] += _len(items)
        if items_seen[0] > max_items:
            raise NotPlain("too large to send", "", False, True)
        out = []
        for i, e in _enumerate(items):
            try:
                out.append(walk(e, depth + 1))
            except NotPlain as err:
                where = (f"[{i}]" if tag in ("L", "T") else "") + err.args[1]
                raise NotPlain(err.args[0], where, True, err.args[3]) from None
        return [tag, out]

    def encode(x) -> str:
        """'=' + JSON, '?' + what the value is (not plain), '#' + why it cannot be sent (a limit)."""
        items_seen[0] = 0
        try:
            text = dumps(walk(x, 0))
        except NotPlain as e:
            what, where, nested, limit = e.args
            if limit:
                return "#" + what
            return "?" + (f"a {_name(_type(x))} holding {what}" + (f" at {where}" if where else "") if nested else what)
        except _ValueError:  # an int with more digits than sys.get_int_max_str_digits()
            return "#an int too large to send"
        except _BaseException as e:  # MemoryError, RecursionError
            return "#the value could not be encoded (" + _name(_type(e)) + ")"
        if _len(text) > max_chars:
            return f"#too large to send ({_len(text)} characters, over {max_chars})"
        return "=" + text

    return encode


def _make_method_guard(encode):
    """The function leaves call for `x.m(args)` (see _Guard). On a list, tuple, dict, set or frozenset (or a
    subclass), a method that compares or hashes (count, index, get, ...), and on any builtin value a dunder
    method, runs only if the receiver and the arguments are plain: `[A(), A()].count(3)` would otherwise let
    A's __eq__ decide. Other receivers (the program's own objects, modules) are called as they are."""
    _type, _getattr, _TypeError = type, getattr, TypeError
    _mro, _name = type.__dict__["__mro__"].__get__, type.__dict__["__name__"].__get__
    containers, scalars = (list, tuple, dict, set, frozenset), (bool, int, float, complex, str, bytes)
    comparing = _COMPARING_METHODS

    def kind(t) -> str:
        for m in _mro(t):
            for c in containers:
                if m is c:
                    return "container"
            for c in scalars:
                if m is c:
                    return "scalar"
        return ""

    def guard(obj, name, /, *args, **kwargs):
        k = kind(_type(obj))
        if (k == "container" and name in comparing) or (k and name[:2] == "__"):
            for v in (obj, args, kwargs):
                r = encode(v)
                if r[0] != "=":
                    raise _TypeError(f"{_name(_type(obj))}.{name}() needs plain values, got {r[1:]} (a custom "
                                     f"__eq__ or __hash__ could fake its result)")
        return _getattr(obj, name)(*args, **kwargs)

    return guard


def _confine(p: dict) -> list[str]:
    """Apply every layer this platform allows, return their names. May fork (PID namespace): it returns in
    the process that is to run the program."""
    limits = p["limits"]
    for name in limits["preimport"]:
        try:
            __import__(name)
        except ImportError:
            pass
    _set_rlimits(limits)
    layers = ["session", "rlimits"]
    layers += _namespaces_and_uid(p["uid"], limits["namespaces"])
    if "pidns" in layers:
        _become_namespace_init()
    _set_nproc(limits["max_processes"])
    if limits["audit_hook"]:
        _install_audit_hook(p["workdir"])
        layers.append("audit_hook")
    return layers


def _set_rlimits(limits: dict) -> None:
    import resource

    def cap(which: str, value: int) -> None:  # hard = soft: the program cannot raise them again
        if hasattr(resource, which):
            try:
                resource.setrlimit(getattr(resource, which), (value, value))
            except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
                pass

    cap("RLIMIT_AS", limits["memory_mb"] << 20)
    cap("RLIMIT_FSIZE", limits["max_file_bytes"])
    cap("RLIMIT_NOFILE", limits["max_open_files"])
    cap("RLIMIT_CORE", 0)
    # soft limit: SIGXCPU; hard limit one second later: SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))


def _set_nproc(n: int) -> None:
    # set last: it counts every process of the uid, and would otherwise stop our fork into the PID namespace
    import resource

    if hasattr(resource, "RLIMIT_NPROC"):
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _namespaces_and_uid(uid: int | None, want_namespaces: bool) -> list[str]:
    """As root: unshare net+pid (needs CAP_SYS_ADMIN), then drop to `uid`. Not root, or refused as root:
    try the same inside a new user namespace, which many kernels allow unprivileged users to create."""
    layers = []
    if want_namespaces and os.geteuid() == 0 and _unshare(_CLONE_NEWNET | _CLONE_NEWPID):
        layers += ["netns", "pidns"]
    if uid is not None and os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            layers.append(f"uid={uid}")
        except OSError:  # e.g. a uid the user namespace does not map; isolation reports it missing
            pass
    if want_namespaces and "netns" not in layers and _unshare(_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWPID):
        layers += ["userns", "netns", "pidns"]
    return layers


def _libc():
    try:
        import ctypes  # imported while still privileged; the audit hook removes it before the program runs

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _unshare(flags: int) -> bool:
    libc = _libc() if sys.platform.startswith("linux") else None
    return libc is not None and libc.unshare(flags) == 0


def _become_namespace_init() -> None:
    """After unshare(CLONE_NEWPID) our next child is pid 1 of the new namespace: when it exits the kernel
    kills everything left inside. This process stays outside as supervisor and exits as the child did."""
    pid = os.fork()
    if pid == 0:
        # set after the uid change (which clears it): if the parent kills the supervisor, we die too,
        # even if the program left the process group
        libc = _libc()
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)  # 128+N: "killed by signal N", as a shell reports it


def _install_audit_hook(workdir: str) -> None:
    """Delete escape hatches that raise no audit event, then add the hook (it cannot be removed)."""
    import posix

    for mod in (os, posix, signal, sys.modules.get("_signal")):
        for name in ("setsid", "setpgid", "setpgrp", "pidfd_open", "pidfd_send_signal"):
            if mod is not None and hasattr(mod, name):
                delattr(mod, name)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess")]:
        del sys.modules[name]  # and re-importing them is blocked
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    roots |= {os.path.realpath(p) for p in sys.path if p}
    sys.addaudithook(_make_audit_hook(os.path.realpath(workdir), tuple(sorted(roots))))


def _make_audit_hook(workdir: str, read_roots: tuple[str, ...]):
    """Everything the hook uses is bound here, not looked up when it runs: the program may replace
    builtins (isinstance, any) or os.path functions to make a forbidden path look allowed."""
    _str, _bytes, _int, _type, _isinstance, _len = str, bytes, int, type, isinstance, len
    deny = PermissionError
    blocked, prefixes, imports, path_events = _BLOCKED_EVENTS, _BLOCKED_PREFIXES, _BLOCKED_IMPORTS, _PATH_EVENTS
    write_flags, devices, read_ok = _WRITE_FLAGS, _DEVICES, read_roots + (workdir,)

    def absolute(path) -> str | None:
        """Lexical absolute path (relative ones are in the temp dir: chdir is blocked); None for a file
        descriptor. Lexical is enough because the program cannot create symlinks or hard links."""
        if _isinstance(path, _int):
            return None
        if _isinstance(path, _bytes):
            path = _bytes.decode(path, "utf-8", "surrogateescape")
        elif _isinstance(path, _str):
            path = _str.__str__(path)  # an exact str: a subclass could override split() or startswith()
        else:  # os.PathLike: __fspath__ could answer differently when open() calls it again
            raise deny(f"sandbox allows only str or bytes paths, got {_type(path).__name__}")
        parts: list = []
        for part in _str.split(path if path[:1] == "/" else workdir + "/" + path, "/"):
            if part == "..":
                parts = parts[:-1]
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path, roots: tuple) -> bool:
        p = absolute(path)
        if p is None or p in devices:
            return True
        for r in roots:
            if p == r or p.startswith(r + "/"):
                return True
        return False

    def hook(event: str, args: tuple) -> None:
        if event in blocked or event.startswith(prefixes):
            raise deny(f"sandbox blocked {event}")
        if event == "import" and args[0] in imports:
            raise deny(f"sandbox blocked import of {args[0]}")
        if event == "open":  # args: path, mode, flags (flags is computed by CPython, so it can be trusted)
            writes = not _isinstance(args[2], _int) or args[2] & write_flags
            # os.open (mode None) only inside: a directory fd from elsewhere would let os.open(name,
            # dir_fd=fd) create files there, and the event does not show dir_fd
            if (writes or args[1] is None) and not inside(args[0], (workdir,)):
                raise deny(f"sandbox blocked writing {args[0]!r} outside its temp dir")
            if not writes and not inside(args[0], read_ok):
                raise deny(f"sandbox blocked reading {args[0]!r} outside its temp dir and the stdlib")
        elif event in path_events:
            for i in path_events[event]:
                if i < _len(args) and not inside(args[i], (workdir,)):
                    raise deny(f"sandbox blocked {event} on {args[i]!r} outside its temp dir")
        elif event in ("os.listdir", "os.scandir") and not inside(args[0] if args and args[0] is not None else ".",
                                                                    read_ok):
            raise deny(f"sandbox blocked listing {args[0]!r}")

    return hook


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child_main(sys.argv[2])
