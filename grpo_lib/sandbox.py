"""Run untrusted Python (model-generated code) against test cases in a separate, limited process.

    run_untrusted(code, tests, limits) -> SandboxResult(passed, total, reason, output, ...)
    run_many([(code, tests), ...], limits, max_workers, deadline_s) -> [SandboxResult]   (bounded pool)

`tests` are Python snippets, usually one `assert` each; a test passes if, after the code ran, its statements
run without raising and each of its asserts holds, judged in the parent process (grpo_lib.judge) on plain
values the program sent back (see "How tests are judged" below).

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
Not in the program's process, where an object whose __eq__ always says True would pass any test:
grpo_lib.judge splits each assert (_plan_test); the child evaluates only the sub-expressions whose values
come from the program ("leaves") and sends each back as plain data (_make_encoder: exact builtin types, read
without calling any of the program's code), and the parent judges the rest of the assert on those values
(_judge). What counts as plain data, the type-strict equality, and the forms of test that cannot be judged
(each such test fails, with a reason saying what to write instead) are in grpo_lib.judge's docstring.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace

if __name__ != "__main__":
    # Parent-only modules. The child runs this file alone as a script (python -I -S: grpo_lib is not
    # importable there; the judge is the parent's) and must not hold subprocess (whose
    # _posixsubprocess.fork_exec is not audited) where the program could reach it through __main__.
    import secrets
    import selectors
    import shutil
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from grpo_lib.judge import _judge, _plan_test


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
# child: confine this process, then run the program and the tests
# ----------------------------------------------------------------------------------------------

_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG = 1

_MAX_VALUE_CHARS = 1_000_000  # one value, encoded; larger ones are refused
# shared with grpo_lib.judge, which plans the leaves and decodes their values: the child cannot import it, so
# both modules define these two, and tests/test_judge.py checks that they agree
_MAX_DEPTH = 40  # containers nested deeper are not plain values
_METHOD_GUARD = "__sandbox_method__"  # name of the guard for method calls inside leaves (see _make_method_guard)

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
    judge._plan_test), reporting on the result pipe: 'test i 1|0', 'value i j =<plain>|?<why not>|!<exception>'."""
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


def _make_describer():
    """judge._describe_exception, with its builtins bound before the program runs (it may replace str or type)."""
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
    """encode(value) -> '=' + JSON of a tagged tree of exact builtins (see judge._untag), or '?' + what the value is
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
    """The function leaves call for `x.m(args)` (see judge._Guard). On a list, tuple, dict, set or frozenset (or a
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
