"""Run untrusted Python (model-generated code) against a dataset's tests, confined in a separate process.

    run_untrusted(code, spec, limits, stdio=False) -> SandboxResult(passed, total, reason, failures, ...)
    run_many([(code, spec), ...], limits, max_workers, deadline_s) -> [SandboxResult]   (bounded pool)

`spec` is a test spec (grpo_lib.judge: assert snippets, a HumanEval check function, stdin/stdout or call-based
cases) or, as a shorthand, a list of assert snippets. grpo_lib.verify builds specs from dataset columns.

The processes of one run
------------------------
    trainer (T) ──job──► fork server (Z) ──fork──► judge (J) ──fork──► program (P)
        ▲                                             │  ▲                  │
        └──────── verdicts, one line per test ────────┘  └─ plain values ───┘
        ▲
        └──────── the program's stdout+stderr (capped) ─────────────────────┘

  Z  `python -I -S -B sandbox.py --fork-server`, started once per trainer process: isolated mode, no
     site-packages, the standard-library modules of `SandboxLimits.preimport` loaded once. It never reads a
     program or a test: for each job it receives only pipe ends and the limits, and forks J. So a run costs a
     fork, not an interpreter start (see bench/code_reward.py).
  J  the judge: forks P first, before it reads anything, so that nothing of the tests is in P's memory; then
     reads the tests and runs them (trusted dataset code) with grpo_lib.judge, where every name the program
     defines is a proxy whose calls travel to P as plain values and come back as plain values. Every
     comparison happens in J. J runs as the trainer's user but is bounded like the rest: T kills J's process
     group (J, P and whatever P started) at the deadline, judging included.
  P  the program: confines itself (below), reads the code, runs it, reports the isolation layers that engaged
     as its first line (before any program code runs, so they cannot be forged), then answers J's requests
     (call, attribute, len/str/iter/next, a run on given stdin) until J closes the pipe.

T reads two pipes with caps and a deadline: J's verdict lines (only J holds that pipe) and P's stdout+stderr.

What is isolated, and where
---------------------------
Checked on Linux as root with CAP_SYS_ADMIN (this dev container) by tests/test_sandbox.py. Every run reports
the layers that actually engaged in `SandboxResult.isolation`; check it on a new platform.

  every POSIX platform
    - separate process in its own session; T kills the whole process group (SIGKILL) at the wall-clock
      limit, so the harness never waits longer than `timeout_s` (+ ~0.1 s) per program
    - rlimits: CPU seconds, address space (memory), size of any written file, open files, no core dumps
    - environment: PATH, HOME=TMPDIR=<temp dir>, LANG only: no API keys or tokens are inherited
    - working directory: a fresh temp dir, removed afterwards without following links and without recursion
      (a 2,500-deep tree is removed like a flat one); stdin is /dev/null; every other descriptor is closed
    - Python audit hook (sys.addaudithook), installed before the program runs: blocks process creation,
      signals, sockets, ctypes, setrlimit, chdir, links, sqlite3, gc and sys._current_frames introspection,
      writes and deletes outside the temp dir, reads and listings outside the temp dir and the standard
      library, os.open outside the temp dir, paths that are not str or bytes, and re-importing the modules
      whose escape hatches are deleted. Functions that raise no audit event are deleted before the program
      runs: os.setsid/setpgid/setpgrp (leaving the process group), os.mknod/mkfifo (files outside the temp
      dir), os.pidfd_open, and the loaders of native code (_imp.create_dynamic, create_builtin, exec_dynamic,
      exec_builtin): no extension module (cffi, _posixsubprocess, _posixshmem, _sqlite3, a .so the program
      wrote) and no fresh copy of posix can be loaded, whatever files the host's Python installation lets the
      sandbox user read. CPython documents audit hooks as *not* a sandbox: code that corrupts interpreter memory
      can get past them; they are defense in depth, the kernel layers below are the boundary where available.
  Linux, parent running as root (containers, Colab)
    - P drops to uid/gid `sandbox_uid` (65534, nobody) with no supplementary groups: the kernel then refuses
      signals to the trainer and J, reading root's files, writing outside world-writable directories, and
      enforces RLIMIT_NPROC. Where the interpreter's files are unreadable to that uid (a pyenv under /root, as
      here), the program can import only what was loaded before the drop; on Colab (stdlib in /usr) the
      pure-Python standard library is importable, native code still is not (above).
  Linux, where unshare(2) is permitted (root with CAP_SYS_ADMIN, or unprivileged user namespaces)
    - network namespace: only a loopback interface that is down, so every connection fails
    - PID namespace: the program is pid 1 of its own namespace, sees no other pid to signal, and when it
      dies (or its supervisor is killed) the kernel kills every process it left behind. The supervisor
      reports the program's exact wait status to J (an exit code of 200 is an exit code, not a signal).
    Docker's default seccomp profile, and hence many hosted notebooks, refuse unshare: there `isolation`
    lacks "netns"/"pidns" and network access is blocked only by the audit hook. Not tested on Colab.

Not isolated anywhere: CPU and memory bandwidth (a program can slow the machine for `timeout_s`); at the
kernel level, the process list in /proc and world-writable directories such as /tmp and /dev/shm (blocked by
the audit hook and the deleted functions only); disk space: `max_file_bytes` bounds each file, not their
number, while the program runs. Windows is not supported.

How tests are judged (reward hacking): see grpo_lib.judge. In short: the test code runs in J, the program in
P; only plain values cross (exact builtin types, read without calling the program's code), so an object with
a custom __eq__/__bool__/__hash__, an int or str subclass, output forged on any descriptor, or a program that
walks stack frames earns nothing: the expected values are never in P, and no verdict is computed there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace

if __name__ != "__main__":
    # Parent-only modules (T). Z, J and P run this file alone as a script (python -I -S: grpo_lib is not
    # importable there); P must not hold subprocess (whose _posixsubprocess.fork_exec is not audited).
    import atexit
    import selectors
    import socket
    import subprocess
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from grpo_lib import judge as _judge_module


# Standard-library modules imported before P drops privileges: after the drop the interpreter's files may be
# unreadable to sandbox_uid (e.g. a pyenv under /root); then a program can import only these.
PREIMPORT = ("abc", "array", "base64", "bisect", "calendar", "cmath", "collections", "contextlib", "copy",
             "dataclasses", "datetime", "decimal", "encodings.idna", "enum", "fractions", "functools",
             "glob", "hashlib", "heapq", "itertools", "json", "math", "numbers", "operator", "pprint",
             "queue", "random", "re", "shutil", "socket", "statistics", "string", "struct", "textwrap",
             "threading", "time", "traceback", "typing", "unicodedata", "warnings", "weakref",
             # builtin and extension modules: no other can be loaded once P deleted the loaders of native code
             "gc", "errno", "binascii", "zlib", "csv", "pickle", "io", "locale", "select", "sys")


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
    """Tests that passed (judged on plain values, outside the program)."""
    total: int
    """Number of tests (one for a HumanEval check function; one per snippet or case otherwise)."""
    reason: str
    """Why: 'ok: 3/3 tests passed', 'solution raised ...', 'wall-clock time limit ...', '1/3 tests failed;
    first: test 2: AssertionError (the program answered with A, not plain data: ...)', ..."""
    output: str = ""
    """Beginning of the program's stdout+stderr (at most max_output_bytes)."""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    isolation: tuple[str, ...] = field(default_factory=tuple)
    """Layers that engaged, e.g. ('session', 'rlimits', 'netns', 'pidns', 'uid=65534', 'audit_hook')."""
    failures: list[str] = field(default_factory=list)
    """'test i: why' for each test that was judged and failed (tests never reached are in `reason`)."""

    @property
    def fraction(self) -> float:
        """passed / total (0.0 when there are no tests)."""
        return self.passed / self.total if self.total else 0.0


# ----------------------------------------------------------------------------------------------
# T: the trainer's side
# ----------------------------------------------------------------------------------------------

_VERDICT_CAP = 4_000_000  # bytes of verdict lines accepted from J


def as_spec(tests) -> dict:
    """A spec (grpo_lib.judge) from a spec or a list of assert snippets."""
    if isinstance(tests, dict):
        if tests.get("kind") not in _judge_module.SPEC_KINDS:
            raise ValueError(f"test spec kind {tests.get('kind')!r}: expected one of {_judge_module.SPEC_KINDS}")
        return tests
    return {"kind": "asserts", "setup": "", "tests": [str(t) for t in tests]}


def run_untrusted(code: str, tests, limits: SandboxLimits | None = None, stdio: bool | None = None) -> SandboxResult:
    """Run `code` and judge it on `tests` (a spec, or a list of assert snippets), confined.

    stdio: run the program once per stdin case instead of importing it (default: the spec is a stdio one).
    Never raises for anything the program does and never waits past limits.timeout_s (+ ~0.1 s), judging
    included; a failure of the harness itself comes back as passed=0 with reason 'harness error: ...'."""
    limits = limits or SandboxLimits()
    start = time.monotonic()
    workdir = None
    try:
        spec = as_spec(tests)
        total = _judge_module.count_tests(spec)
    except (ValueError, KeyError, TypeError) as e:
        return SandboxResult(0, 0, f"harness error: bad test spec: {e}")
    stdio = spec["kind"] == "stdio" if stdio is None else stdio
    try:
        workdir, uid = _make_workdir(limits)
        result = _run_in(workdir, uid, code, spec, total, stdio, limits)
    except Exception as e:  # the training loop survives anything here (rewards.RewardTimeout is no Exception)
        result = SandboxResult(0, total, f"harness error: {type(e).__name__}: {e}")
    finally:
        if workdir is not None:
            remove_tree(workdir)
    result.wall_s = time.monotonic() - start
    return result


def run_many(jobs, limits: SandboxLimits | None = None, max_workers: int | None = None,
             deadline_s: float | None = None) -> list[SandboxResult]:
    """run_untrusted over [(code, tests), ...] or [(code, tests, stdio), ...] with at most `max_workers`
    programs at once (threads that each wait on one job). With `deadline_s`, each job's wall limit (judging
    included) is cut to the time left and jobs that would start after the deadline are not run (passed=0,
    reason says so), so the call returns within about deadline_s + 0.2 s. Results are in the order of `jobs`."""
    limits = limits or SandboxLimits()
    jobs = list(jobs)
    end = None if deadline_s is None else time.monotonic() + deadline_s

    def run_one(job) -> SandboxResult:
        code, tests, *rest = job
        stdio = rest[0] if rest else None
        if end is None:
            return run_untrusted(code, tests, limits, stdio)
        left = end - time.monotonic()
        if left < 0.05:
            try:
                total = _judge_module.count_tests(as_spec(tests))
            except (ValueError, KeyError, TypeError):
                total = 0
            return SandboxResult(0, total, f"not run: batch time budget deadline_s={deadline_s:g} s used up "
                                           f"(raise it or max_workers)")
        return run_untrusted(code, tests, replace(limits, timeout_s=min(limits.timeout_s, left)), stdio)

    pool = ThreadPoolExecutor(max_workers=max_workers or default_workers(), thread_name_prefix="sandbox")
    try:
        return list(pool.map(run_one, jobs))
    finally:
        # interrupted (e.g. by the trainer's reward timeout): drop queued jobs, wait for running ones, each of
        # which ends within its own wall limit
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Programs run at once by default: one per CPU core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _make_workdir(limits: SandboxLimits) -> tuple[str, int | None]:
    """A fresh temp dir (mode 0700) owned by the uid P will drop to; that uid is None when we are not root, or
    when it cannot own files here (e.g. unmapped in a rootless container)."""
    workdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
    uid = limits.sandbox_uid if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    if uid is not None:
        try:
            os.chown(workdir, uid, uid)
        except OSError:
            uid = None
    return workdir, uid


def remove_tree(path: str, max_steps: int = 10_000_000) -> None:
    """Delete a directory tree the program wrote, as root, safely: one directory descriptor at a time (depth
    costs neither recursion nor descriptors), never following a symlink (each directory is opened with
    O_NOFOLLOW relative to its parent's descriptor and chmod-ed through that descriptor), going back up through
    '..'. Run only after every process that could write there is dead."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    names: list[str] = []  # the path from `path` down to fd, one name per level
    stuck: set[tuple[int, str]] = set()  # (depth, name) of directories that could not be entered or removed
    for _ in range(max_steps):
        try:
            os.fchmod(fd, 0o700)  # a program running as our uid may have made it unreadable
        except OSError:
            pass
        sub = None
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if (len(names), entry.name) not in stuck:
                            sub = entry.name
                            break
                    else:
                        try:
                            os.unlink(entry.name, dir_fd=fd)
                        except OSError:
                            pass
        except OSError:
            pass
        if sub is not None:
            try:
                child = os.open(sub, flags, dir_fd=fd)
            except OSError:
                stuck.add((len(names), sub))
                continue
            os.close(fd)
            fd, names = child, names + [sub]
            continue
        if not names:
            break
        parent = os.open("..", flags, dir_fd=fd)  # '..' of a directory is never a symlink
        os.close(fd)
        fd, name = parent, names.pop()
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            stuck.add((len(names), name))
    os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _child_env(workdir: str) -> dict[str, str]:
    """P's whole environment: nothing from the trainer's (API keys, tokens) is passed on."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


class _ForkServer:
    """Z, started on first use and again if it died; one per trainer process, shared by the pool's threads.
    Each job is one SOCK_SEQPACKET message (atomic, so threads need no ordering) carrying five pipe ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._sock = None
        atexit.register(self.close)

    def submit(self, header: dict, fds: list[int]) -> None:
        data = json.dumps(header).encode()
        with self._lock:
            for attempt in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                try:
                    socket.send_fds(self._sock, [data], fds)
                    return
                except OSError:
                    if attempt:
                        raise
                    self._proc = None

    def _start(self) -> None:
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--fork-server", str(theirs.fileno()),
                 os.path.abspath(_judge_module.__file__)] + (["debug"] if _DEBUG else []),
                pass_fds=(theirs.fileno(),), env=_child_env("/"), cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=None if _DEBUG else subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        self._sock = ours

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # Z exits when its socket reports end-of-file
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


_FORK_SERVER = _ForkServer() if __name__ != "__main__" else None
_DEBUG = os.environ.get("GRPO_SANDBOX_DEBUG") == "1"  # Z and J keep stderr (for debugging the harness itself)


def _run_in(workdir: str, uid: int | None, code: str, spec: dict, total: int, stdio: bool,
            limits: SandboxLimits) -> SandboxResult:
    """1) five pipes, their far ends to Z, 2) write the code (to P) and the spec (to J), 3) read the verdicts
    and the output until done, the deadline or a cap, 4) kill J's process group, 5) summarize."""
    deadline = time.monotonic() + limits.timeout_s
    code_r, code_w = os.pipe()
    spec_r, spec_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    out_r, out_w = os.pipe()
    hold_r, hold_w = os.pipe()  # J waits on it before exiting, so its pid (our kill target) stays its own
    ours, closed, job = [code_w, spec_w, verdict_r, out_r, hold_w], set(), {}
    try:
        header = {"workdir": workdir, "uid": uid, "limits": asdict(limits), "stdio": stdio}
        try:
            _FORK_SERVER.submit(header, [code_r, spec_r, verdict_w, out_w, hold_r])
        finally:
            for fd in (code_r, spec_r, verdict_w, out_w, hold_r):
                os.close(fd)
        writes = {code_w: json.dumps({"code": code}).encode(), spec_w: json.dumps(spec).encode()}
        out, verdicts, stop = _exchange(writes, out_r, verdict_r, deadline, limits.max_output_bytes, closed, job)
        events = [line.split(" ", 3) for line in verdicts.decode("utf-8", "replace").split("\n") if line]
        return _summarize(events, stop, total, limits, out)
    finally:
        if job.get("pid"):  # also when the trainer's reward timeout interrupts us (rewards.RewardTimeout)
            try:
                os.killpg(job["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for fd in ours:
            if fd not in closed:  # (a closed number may already be another thread's)
                os.close(fd)


def _exchange(writes: dict[int, bytes], out_fd: int, verdict_fd: int, deadline: float, cap: int, closed: set,
              job: dict):
    """Write `writes` (closing each pipe when written) while reading the output and verdict pipes until the
    verdicts end with 'done' (then what is left of the output is drained), both close, the deadline, or a
    cap; the written
    pipes it closed go into `closed`, J's pid (its first line) into job["pid"] as soon as it arrives. Returns
    (output, verdicts, stop) with stop None, 'timeout', 'output' or 'verdicts'; memory stays below the caps."""
    bufs = {out_fd: bytearray(), verdict_fd: bytearray()}
    caps = {out_fd: cap, verdict_fd: _VERDICT_CAP}
    done_at = None
    os.set_blocking(out_fd, False)  # drained without waiting once J says 'done' (P may still be alive)
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        for fd in writes:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_WRITE)
        while True:
            now = time.monotonic()
            if done_at is None and bufs[verdict_fd].endswith(b"done\n"):
                # P answered every request, so what it printed before its last answer is in the pipe already
                done_at = now
                while out_fd in sel.get_map() and len(bufs[out_fd]) <= cap:
                    try:
                        chunk = os.read(out_fd, 65536)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    bufs[out_fd] += chunk[: cap + 1 - len(bufs[out_fd])]
                if len(bufs[out_fd]) > cap:
                    return bytes(bufs[out_fd][:cap]), bytes(bufs[verdict_fd]), "output"
                return bytes(bufs[out_fd]), bytes(bufs[verdict_fd]), None
            reading = [fd for fd in bufs if fd in sel.get_map()]
            if not reading:
                return bytes(bufs[out_fd][:cap]), bytes(bufs[verdict_fd]), None
            if now >= deadline:
                return bytes(bufs[out_fd][:cap]), bytes(bufs[verdict_fd]), "timeout"
            for key, _ in sel.select(deadline - now):
                fd = key.fd
                if fd in writes:
                    try:
                        n = os.write(fd, writes[fd])
                    except BlockingIOError:
                        continue
                    except OSError:  # the reader is gone (a crashed job): nothing more to send
                        n = len(writes[fd])
                    writes[fd] = writes[fd][n:]
                    if not writes[fd]:  # closed now: the reader waits for end-of-file
                        sel.unregister(fd)
                        os.close(fd)
                        closed.add(fd)
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                bufs[fd] += chunk[: caps[fd] + 1 - len(bufs[fd])]
                if fd == verdict_fd and "pid" not in job and b"\n" in bufs[fd]:
                    first = bufs[fd].split(b"\n", 1)[0].split(b" ")
                    job["pid"] = int(first[1]) if first[0] == b"pid" and first[1:2] and first[1].isdigit() else None
                if len(bufs[fd]) > caps[fd]:
                    return (bytes(bufs[out_fd][:cap]), bytes(bufs[verdict_fd][:_VERDICT_CAP]),
                            "output" if fd == out_fd else "verdicts")


def _summarize(events: list[list[str]], stop: str | None, total: int, limits: SandboxLimits,
               out: bytes) -> SandboxResult:
    """Verdict lines -> SandboxResult. Lines (J's only): 'pid N', 'isolation a,b', 'solution 0 <why>',
    'test i 1', 'test i 0 <why>', 'exit <wait status> <cpu s>', 'done'."""
    passed, failures, judged, layers, solution_error, exit_info, done = 0, [], set(), (), None, None, False
    for e in events:
        if e[0] == "isolation" and len(e) > 1 and not layers:
            layers = tuple(x for x in " ".join(e[1:]).split(",") if x)
        elif e[0] == "solution" and len(e) > 2:
            solution_error = " ".join(e[2:])
        elif e[0] == "test" and len(e) > 2 and e[1].isdigit() and int(e[1]) < total and int(e[1]) not in judged:
            judged.add(int(e[1]))
            if e[2] == "1":
                passed += 1
            else:
                failures.append(f"test {e[1]}: {e[3] if len(e) > 3 else 'failed'}")
        elif e[0] == "exit" and len(e) > 2:
            try:
                exit_info = (int(e[1]), float(e[2]))
            except ValueError:
                pass
        elif e[0] == "cpu" and len(e) > 1:
            try:
                exit_info = (None, float(e[1]))
            except ValueError:
                pass
        elif e[0] == "done":
            done = True
    cpu_s = exit_info[1] if exit_info else 0.0
    if stop == "timeout":
        reason = f"wall-clock time limit: killed after {limits.timeout_s:.3g} s"
    elif stop == "output":
        reason = f"output limit: printed more than {limits.max_output_bytes} bytes"
    elif stop == "verdicts":
        reason = f"harness error: the judge's report exceeded {_VERDICT_CAP} bytes"
    elif solution_error is not None:
        reason = f"solution raised {solution_error}"
    elif not done:
        reason = "harness error: the judge process ended without a report"
    elif len(judged) < total:
        reason = (describe_exit(*exit_info, limits, out) if exit_info and exit_info[0] is not None
                  else "the program stopped") + " before the tests finished"
    elif passed == total:
        reason = f"ok: {passed}/{total} tests passed"
    else:
        reason = f"{total - passed}/{total} tests failed; first: {failures[0]}"
    return SandboxResult(passed, total, reason, out.decode("utf-8", "replace"), cpu_s=cpu_s, isolation=layers,
                         failures=failures)


def describe_exit(status: int, cpu_s: float, limits: SandboxLimits, out: bytes = b"") -> str:
    """A wait status as words: 'exited with code 200', 'CPU time limit: ...', 'killed by SIGSEGV'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s):
            return f"CPU time limit: used {cpu_s:.1f} s of cpu_s={limits.cpu_s}"
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code == 1 and b"MemoryError" in out[-2000:]:
        return f"memory limit: memory_mb={limits.memory_mb}"
    return f"exited with code {code}"


# ----------------------------------------------------------------------------------------------
# Z: the fork server
# ----------------------------------------------------------------------------------------------

def _fork_server_main(sock_fd: int, judge_path: str) -> None:
    """Load the preimports and grpo_lib.judge (by path: grpo_lib is not importable here), keep _SPARES judges
    forked in advance (each with its program process forked too, both waiting), and hand each job message to
    one of them, until the trainer closes the socket. Children are reaped by the kernel (SIGCHLD ignored)."""
    import gc
    import importlib.util
    import socket as _socket

    for name in PREIMPORT:
        try:
            __import__(name)
        except ImportError:
            pass
    _libc()  # loaded once here; P drops its reference before the program runs
    spec = importlib.util.spec_from_file_location("grpo_sandbox_judge", judge_path)
    judge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judge)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.freeze()  # what is loaded now is never traversed again: forked children keep sharing those pages
    sock = _socket.socket(fileno=sock_fd)
    spares: list = []
    while True:
        while len(spares) < _SPARES:  # forked while the last job runs, off the next one's critical path
            spares.append(_fork_spare(judge, sock_fd))
        try:
            data, fds, _, _ = _socket.recv_fds(sock, 1 << 20, 8)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        if len(fds) == 5:
            for _ in range(2):  # a spare that died (it never should) is replaced once
                spare = spares.pop(0) if spares else _fork_spare(judge, sock_fd)
                try:
                    _socket.send_fds(spare, [data], fds)
                    break
                except OSError:
                    pass
                finally:
                    spare.close()
        for fd in fds:
            os.close(fd)


_SPARES = 2  # judges (each with its program process) forked in advance by Z


def _fork_spare(judge, server_fd: int):
    """Fork a judge J that forks its program process P at once; both wait for a job. Returns the socket on
    which Z hands J the job (header and the five pipe ends)."""
    import socket as _socket

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        code = 70
        try:
            _judge_main(theirs, judge)
            code = 0
        except BaseException:
            if sys.argv[-1:] == ["debug"]:
                import traceback

                traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return ours


def _close_fds_except(keep) -> None:
    """Close every descriptor but `keep` (the fork server's socket, other spares' sockets and other jobs'
    pipes must not leak into a judge or a program)."""
    keep = sorted(set(keep))
    start = 0
    for fd in keep + [os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536]:
        if start < fd:  # (closerange(n, n) closes every descriptor from n on: high - 1 wraps around)
            os.closerange(start, fd)
        start = fd + 1


# ----------------------------------------------------------------------------------------------
# J: the judge process
# ----------------------------------------------------------------------------------------------

_JUDGE_MEMORY = 2 << 30  # J's RLIMIT_AS: the test code and the values it decodes, never the trainer's memory


def _judge_main(job_sock, judge) -> None:
    """Fork P (it waits for its half of the job), wait for a job from Z, pass P the code pipe and the output
    pipe, then read the spec, run its tests against P, report: 'pid', 'isolation', 'solution 0 <why>' or
    'test i 1|0 <why>' for each test, 'exit <status> <cpu>', 'done'. Then wait for T to close `hold`."""
    import socket as _socket

    os.setsid()  # our pid is the process group T kills: J, P and anything P starts
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # reap P ourselves (Z ignores SIGCHLD)
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1) if sys.argv[-1:] == ["debug"] else (0, 1, 2):
        os.dup2(devnull, std)  # test code that prints must not write into T's pipes
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    to_p, from_j = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    _close_fds_except({0, 1, 2, job_sock.fileno(), request_r, request_w, reply_r, reply_w, to_p.fileno(),
                       from_j.fileno()})
    pid = os.fork()  # before any job: the expected values are never in P's memory
    if pid == 0:
        try:
            job_sock.close()
            to_p.close()
            for fd in (request_w, reply_r):
                os.close(fd)
            data, fds, _, _ = _socket.recv_fds(from_j, 1 << 20, 4)
            from_j.close()
            if data and len(fds) == 2:
                _program_main(json.loads(data), fds[0], request_r, reply_w, fds[1], judge)
        finally:  # whatever the program did to this process's modules, it never returns into J's code
            os._exit(0)
    from_j.close()
    for fd in (request_r, reply_w):
        os.close(fd)
    data, fds, _, _ = _socket.recv_fds(job_sock, 1 << 20, 8)
    job_sock.close()
    if not data or len(fds) != 5:
        return
    header = json.loads(data)
    code_r, spec_r, verdict_w, out_w, hold_r = fds

    def emit(*fields) -> None:
        line = (" ".join(str(f) for f in fields).replace("\n", " ") + "\n").encode("utf-8", "backslashreplace")
        while line:
            line = line[os.write(verdict_w, line):]

    emit("pid", os.getpid())
    _socket.send_fds(to_p, [data], [code_r, out_w])
    to_p.close()
    for fd in (code_r, out_w):
        os.close(fd)
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_JUDGE_MEMORY, _JUDGE_MEMORY))
    cpu = int(max(10, 4 * header["limits"]["timeout_s"]))  # T kills us at the deadline; this is if T died
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    spec = json.loads(_read_all(spec_r))
    program = judge.Program(request_w, reply_r)
    try:
        first = program.read()
        emit("isolation", ",".join(str(x) for x in first.get("isolation", [])))
        started = program.read()
        if "raised" in started:
            emit("solution", 0, started["raised"])
        else:
            names = started.get("names", {})
            judged = 0
            for i, why in judge.run_spec(spec, program, names if type(names) is dict else {}):
                emit("test", i, 1) if why is None else emit("test", i, 0, why)
                judged += 1
            if judged == judge.count_tests(spec):
                # every test judged: the program's end is not needed (T kills it), only its CPU time, as
                # it reports it (information, never a verdict)
                cpu = program.ask({"op": "cpu"})
                emit("cpu", f"{cpu:.3f}" if type(cpu) is float else "0")
                emit("done")
                os.read(hold_r, 1)
                return
    except judge.ProgramGone:
        pass
    os.close(request_w)  # P's request loop ends; P exits and (with a PID namespace) its supervisor reports
    while program.ended is None:
        try:
            program.read()
        except judge.ProgramGone:
            break
    _, status, usage = os.wait4(pid, 0)
    if program.ended is not None:  # the supervisor's report: the program's own wait status and CPU time
        status, cpu = int(program.ended.get("exit", status)), float(program.ended.get("cpu", 0.0))
    else:
        cpu = usage.ru_utime + usage.ru_stime
    emit("exit", status, f"{cpu:.3f}")
    emit("done")
    os.read(hold_r, 1)  # until T closes it, after killing our process group


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(chunk)


# ----------------------------------------------------------------------------------------------
# P: the program's process
# ----------------------------------------------------------------------------------------------

_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG = 1
_LIBC = None

_MAX_VALUE_CHARS = 1_000_000  # one value, encoded; larger ones are refused
_MAX_DEPTH = 40  # containers nested deeper are not plain values (grpo_lib.judge uses the same bound)

_BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.link", "os.symlink",
    "resource.setrlimit", "resource.prlimit", "sys._current_frames", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "sqlite3.connect", "sqlite3.connect/handle", "sqlite3.enable_load_extension",
    "sqlite3.load_extension", "os.add_dll_directory", "mmap.__new__",
})
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.")
# modules the program may not (re)load: unaudited process creation, or a fresh copy of deleted functions
_UNLOADED = ("ctypes", "_ctypes", "_posixsubprocess", "_posixshmem", "_sqlite3", "sqlite3", "_multiprocessing",
             "multiprocessing", "subprocess", "mmap")
_BLOCKED_IMPORTS = frozenset(_UNLOADED + ("posix", "os", "signal", "_signal", "pty", "_imp", "cffi", "_cffi_backend"))
# event -> positions of its arguments that are paths it creates, changes or deletes
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
                "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,),
                "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.chown": (0,), "shutil.move": (0, 1),
                "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.make_archive": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DEVICES = ("/dev/null", "/dev/urandom", "/dev/zero")



# attributes of builtin values (and of subclasses of builtins) that P refuses to look up for a test: on a
# container holding one of the program's objects they would let its __eq__ or __hash__ answer
_COMPARING_METHODS = frozenset({
    "count", "index", "remove", "sort", "get", "pop", "setdefault", "fromkeys", "add", "discard", "union",
    "intersection", "difference", "symmetric_difference", "issubset", "issuperset", "isdisjoint", "update",
    "intersection_update", "difference_update", "symmetric_difference_update", "find", "rfind", "rindex",
    "startswith", "endswith", "replace", "split", "partition", "strip", "join"})
_BUILTIN_VALUES = (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
# functions that change the process or create files without raising an audit event: deleted before the program
_UNAUDITED = ("setsid", "setpgid", "setpgrp", "pidfd_open", "pidfd_send_signal", "mknod", "mkfifo", "setns",
              "unshare", "openpty", "forkpty", "login_tty")
# loaders of native code and of fresh module copies (an extension the program wrote, posix again)
_NATIVE_LOADERS = ("create_dynamic", "exec_dynamic", "create_builtin", "exec_builtin")


def _program_main(header: dict, code_r: int, request_r: int, reply_w: int, out_w: int, judge) -> None:
    """Confine, read the code, run it, then answer J's requests until J closes the pipe."""
    workdir = header["workdir"]
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.close(out_w)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(_child_env(workdir))
    payload = json.loads(_read_all(code_r))
    layers = _confine(header, reply_w, request_r)
    send = _reply_writer(reply_w)
    send({"isolation": layers})
    _run_program(payload["code"], bool(header.get("stdio")), send, request_r, judge.untag)


def _reply_writer(fd: int):
    streams = (sys.stdout, sys.stderr)  # the originals: the program may replace sys.stdout

    def send(message: dict) -> None:
        # what the program printed reaches T's output pipe before the answer reaches J: T stops reading the
        # output when J reports 'done'
        for stream in (sys.stdout, sys.stderr) + streams:
            try:
                stream.flush()
            except BaseException:  # closed or replaced by the program
                pass
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:  # J is gone: nothing to answer
            os._exit(0)

    return send


def _run_program(code: str, stdio: bool, send, request_r: int, untag) -> None:
    """Run the program (or, for stdin/stdout, only compile it), send its names, then answer J's requests;
    `untag` is grpo_lib.judge.untag (arguments arrive in its tagged form, handles resolved here)."""
    import builtins
    import io

    encode, describe = _make_encoder(), _make_describer()
    try:
        compiled = compile(code, "solution.py", "exec")
        ns = {"__name__": "solution", "__builtins__": builtins}
        if not stdio:
            exec(compiled, ns)
    except BaseException as e:  # anything raised, SystemExit included, fails every test
        send({"raised": describe(e)})
        _exit_quietly()
    names = {}
    for k, v in list(ns.items()):
        if type(k) is not str or k.startswith("__"):
            continue
        if type(v) is type(builtins):
            names[k] = "module"
            continue
        r = encode(v)
        names[k] = ["value", json.loads(r[1:])] if r[0] == "=" and len(r) < 10_000 else "object"
    send({"names": names})
    objects: dict[int, object] = {}

    def resolve(ref):
        where, key = ref
        if where == "g":
            if key not in ns:
                raise NameError(f"name {key!r} is not defined")
            return ns[key]
        return objects[key]

    def answer(value) -> dict:
        r = encode(value)
        if r[0] == "=":
            return {"ok": json.loads(r[1:])}
        if r[0] == "#":
            return {"err": "ValueError", "msg": "the program's answer cannot be sent back: " + r[1:]}
        objects[len(objects)] = value
        return {"h": len(objects) - 1, "type": r[1:]}

    def run_stdio(text: str) -> str:
        out = io.BytesIO()
        saved = sys.stdin, sys.stdout
        stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        sys.stdin = io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8")
        sys.stdout = stdout
        try:
            exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit:  # exit() at the end of a solution is normal
            pass
        finally:
            try:
                stdout.flush()
            except BaseException:  # closed by the program
                pass
            printed = out.getvalue() if not out.closed else b""
            sys.stdin, sys.stdout = saved
        return printed.decode("utf-8", "replace")

    views = {"len": len, "str": str, "iter": iter, "next": next}
    requests = os.fdopen(request_r, "rb")
    while True:
        line = requests.readline()
        if not line:
            _exit_quietly()
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "stdio":
                value = run_stdio(str(req["stdin"]))
            elif op == "cpu":
                value = float(time.process_time())
            elif op == "call":
                fn = resolve(req["ref"])
                args = untag(req["args"], 0, resolve)
                kwargs = untag(req["kwargs"], 0, resolve)
                value = fn(*args, **kwargs)
                if isinstance(fn, type) and value is not None:
                    # an instance the test constructs (Stack(), Point(0, 0)) stays the program's object, even
                    # one that would read as plain (a namedtuple): the test hands it back to the program
                    objects[len(objects)] = value
                    send({"h": len(objects) - 1, "type": _type_name(value)})
                    continue
            elif op == "attr":
                obj, name = resolve(req["ref"]), str(req["name"])
                _refuse_comparing(obj, name)
                value = getattr(obj, name)
            elif op == "view":
                obj = resolve(req["ref"])
                value = views[req["fn"]](obj)
                if req["fn"] == "iter":
                    objects[len(objects)] = value  # an iterator is always a handle (J iterates it)
                    send({"h": len(objects) - 1, "type": "iterator"})
                    continue
            else:
                raise ValueError(f"unknown request {op!r}")
            reply = answer(value)
        except BaseException as e:  # the program's exception (SystemExit included) is its answer
            reply = {"err": _type_name(e), "msg": describe(e).split(": ", 1)[-1] if ": " in describe(e) else ""}
        send(reply)


def _type_name(x) -> str:
    return type.__dict__["__name__"].__get__(type(x))


def _refuse_comparing(obj, name: str) -> None:
    """A test may not call a comparing method of a builtin value that was not plain (it holds the program's
    objects, or is a subclass): `[1, A()].count(2)` would let A.__eq__ answer."""
    if isinstance(obj, _BUILTIN_VALUES) and (name in _COMPARING_METHODS or name.startswith("__")):
        raise TypeError(f"{_type_name(obj)}.{name}() needs plain values, and this {_type_name(obj)} is not plain "
                        f"(a custom __eq__ or __hash__ could fake its result)")


def _exit_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # closed or replaced by the program
            pass
    os._exit(0)


def _make_describer():
    """'Name: message' of an exception, at most 300 characters, whatever its __str__ does."""

    def describe(e) -> str:
        try:
            msg = str.__str__(str(e))
        except BaseException:  # a hostile __str__
            msg = "<unprintable>"
        name = _type_name(e)
        return (name + ": " + msg if msg else name)[:300]

    return describe


def _make_encoder():
    """encode(value) -> '=' + JSON of a tagged tree of exact builtins (see judge.untag), or '?' + what the value is
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



def _confine(header: dict, reply_w: int, request_r: int) -> list[str]:
    """Apply every layer this platform allows, return their names. May fork (PID namespace): it returns in
    the process that is to run the program; the other one supervises it and reports its exit on `reply_w`."""
    global _LIBC
    limits = header["limits"]
    for name in limits["preimport"]:
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                pass
    _set_rlimits(limits)
    layers = ["session", "rlimits"]
    layers += _namespaces_and_uid(header["uid"], limits["namespaces"])
    if "pidns" in layers:
        _become_namespace_init(reply_w, request_r)
    _LIBC = None  # ctypes' handle on libc: the program must not find it through this module
    _set_nproc(limits["max_processes"])
    if limits["audit_hook"]:
        _delete_escape_hatches()
        _install_audit_hook(header["workdir"])
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
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes  # imported while still privileged; deleted before the program runs

            _LIBC = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            return None
    return _LIBC


def _unshare(flags: int) -> bool:
    libc = _libc() if sys.platform.startswith("linux") else None
    return libc is not None and libc.unshare(flags) == 0


def _become_namespace_init(reply_w: int, request_r: int) -> None:
    """After unshare(CLONE_NEWPID) our next child is pid 1 of the new namespace: when it exits the kernel kills
    everything left inside. This process stays outside as supervisor and reports the program's exact wait
    status and CPU time to J on `reply_w` (the program can write lines there too, but only after its own
    ones can it lie about how it ended, which changes a reason, never a verdict)."""
    pid = os.fork()
    if pid == 0:
        # set after the uid change (which clears it): if the supervisor is killed, we die too, even if the
        # program left the process group
        libc = _libc()
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    os.close(request_r)
    _, status, usage = os.wait4(pid, 0)
    data = json.dumps({"exit": status, "cpu": usage.ru_utime + usage.ru_stime}).encode()
    try:
        os.write(reply_w, b"\n" + data + b"\n")  # own line even after a partial line of the program's
    except OSError:
        pass
    os._exit(0)


def _delete_escape_hatches() -> None:
    """Delete what the audit hook cannot see: functions that raise no audit event (leaving the process group,
    creating device files and FIFOs anywhere), the loaders of native code and of fresh copies of builtin
    modules (so no .so, cffi module or second posix can be loaded, whatever the host's file permissions), and
    the already-loaded modules that reach C functions without events."""
    import _imp
    import posix

    for mod in (os, posix, signal, sys.modules.get("_signal")):
        for name in _UNAUDITED + ("pidfd_send_signal",):
            if mod is not None and hasattr(mod, name):
                delattr(mod, name)
    for name in _NATIVE_LOADERS:
        if hasattr(_imp, name):
            delattr(_imp, name)
    for name in [m for m in sys.modules if m.split(".")[0] in _UNLOADED]:
        del sys.modules[name]  # and re-importing them is blocked


def _install_audit_hook(workdir: str) -> None:
    """Add the hook (it cannot be removed)."""
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



if __name__ == "__main__" and len(sys.argv) in (4, 5) and sys.argv[1] == "--fork-server":
    _fork_server_main(int(sys.argv[2]), sys.argv[3])
