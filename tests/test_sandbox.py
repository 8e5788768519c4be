"""Tests for grpo_lib.sandbox: hostile programs score 0 with a reason and leave the machine (and this test
process) unharmed; the kernel layers hold on their own with the audit hook off, where the platform has
them; the pool is bounded; the harness never hangs or raises."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from grpo_lib import sandbox
from grpo_lib.sandbox import SandboxLimits, run_many, run_untrusted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="these tests read /proc and rely on Linux rlimits")

LIMITS = SandboxLimits(timeout_s=1.0, cpu_s=1)
NO_HOOK = SandboxLimits(timeout_s=1.0, cpu_s=1, audit_hook=False)
# the hostile programs are run twice: with every layer this machine has, and with the audit hook and rlimits
# alone, as on a platform that refuses namespaces and the uid drop (here that means staying root)
HOOK_ONLY = SandboxLimits(timeout_s=1.0, cpu_s=1, namespaces=False, sandbox_uid=None)
HOSTILE = pytest.mark.parametrize("limits", [LIMITS, HOOK_ONLY], ids=["all-layers", "hook-only"])
TRIVIAL_TEST = ["assert True"]


def layers(limits: SandboxLimits) -> tuple:
    return run_untrusted("", [], limits).isolation


def processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(pid))
    return found


@pytest.fixture
def victim():
    """A process the hostile program tries to kill, besides this test process."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------------------------
# ordinary programs
# ----------------------------------------------------------------------------------------------


def test_passing_and_failing_tests():
    code = "def add(a, b):\n    return a + b\nprint('hello')"
    r = run_untrusted(code, ["assert add(1, 2) == 3", "assert add(1, 1) == 3", "assert add('a', 'b') == 'ab'"], LIMITS)
    assert (r.passed, r.total, r.fraction) == (2, 3, 2 / 3)
    assert r.reason == "1/3 tests failed; first: test 1: AssertionError"
    assert r.output == "hello\n"
    assert {"session", "rlimits", "audit_hook"} <= set(r.isolation)


def test_syntax_error_and_exceptions_are_reasons():
    assert run_untrusted("def f(:\n", TRIVIAL_TEST, LIMITS).reason.startswith("solution raised SyntaxError")
    r = run_untrusted("def f():\n    return 1 / 0", ["assert f() == 1"], LIMITS)
    assert r.passed == 0 and r.reason == "1/1 tests failed; first: test 0: ZeroDivisionError: division by zero"
    assert run_untrusted("raise SystemExit(0)", TRIVIAL_TEST, LIMITS).reason == "solution raised SystemExit: 0"


def test_stdlib_modules_work():
    code = ("import collections, json, fractions, heapq, itertools, math, re, statistics\n"
            "P = collections.namedtuple('P', 'x y')\n"
            "def f():\n    return json.dumps(P(1, 2)._asdict()) + str(fractions.Fraction(1, 2))")
    assert run_untrusted(code, ["assert f() == '{\"x\": 1, \"y\": 2}1/2'"], LIMITS).reason == "ok: 1/1 tests passed"


def test_program_sees_minimal_env_and_a_fresh_temp_dir_that_is_removed(monkeypatch):
    monkeypatch.setenv("GRPO_SANDBOX_TEST_SECRET", "hunter2-env")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(os.listdir('.'))\n"
            "open('scratch.txt', 'w').write('ok')")
    r = run_untrusted(code, TRIVIAL_TEST, LIMITS)
    env_line, cwd, listing = r.output.splitlines()
    assert env_line == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert listing == "[]"  # the payload (with the result nonce) is gone before the program runs
    assert r.passed == 1 and not os.path.exists(cwd)


def test_results_cannot_be_forged_by_writing_to_other_descriptors():
    code = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x test 0 1\\nx done\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)")
    r = run_untrusted(code, TRIVIAL_TEST, LIMITS)
    assert r.passed == 0 and r.reason == "exited with code 0 before the tests finished"


def test_patching_builtins_does_not_skip_tests():
    code = ("import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
            "def f():\n    return 0")
    assert run_untrusted(code, ["assert f() == 1"], LIMITS).passed == 0


# ----------------------------------------------------------------------------------------------
# hostile programs: each scores 0 with a reason, the machine and this process are unharmed
# ----------------------------------------------------------------------------------------------


@HOSTILE
def test_infinite_loop(limits):
    start = time.monotonic()
    r = run_untrusted("while True:\n    pass", TRIVIAL_TEST, limits)
    assert r.passed == 0 and "time limit" in r.reason  # wall clock or CPU, whichever struck first
    assert time.monotonic() - start < limits.timeout_s + 1.0


@HOSTILE
def test_fork_bomb(limits):
    code = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()"
    r = run_untrusted(code, TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason == "solution raised PermissionError: sandbox blocked os.fork"
    workdir = r.output.strip()
    assert workdir and processes_mentioning(workdir) == []


@pytest.mark.parametrize("code", ["import subprocess", "import _posixsubprocess", "import multiprocessing",
                                  "import os\nos.system('true')", "import os\nos.execv('/bin/true', ['true'])",
                                  "import os\nos.posix_spawn('/bin/true', ['true'], {})", "import os\nos.setsid()"])
def test_other_process_escapes_are_blocked(code):
    r = run_untrusted(code, TRIVIAL_TEST, LIMITS)
    assert r.passed == 0 and r.reason.startswith("solution raised"), r.reason
    assert "sandbox blocked" in r.reason or "has no attribute 'setsid'" in r.reason


@HOSTILE
def test_10_gb_allocation(limits):
    r = run_untrusted("x = bytearray(10 * 1024**3)", TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason == "solution raised MemoryError"


@HOSTILE
@pytest.mark.parametrize("where", ["tmp_path", "/tmp", "relative"])
def test_writing_outside_the_temp_dir(tmp_path, where, limits):
    name = f"grpo_pwned_{os.getpid()}.txt"
    target, on_host = {"tmp_path": (str(tmp_path / name), str(tmp_path / name)),
                       "/tmp": (f"/tmp/{name}", f"/tmp/{name}"),
                       "relative": (f"../{name}", os.path.join(tempfile.gettempdir(), name))}[where]
    r = run_untrusted(f"open({target!r}, 'w').write('pwned')", TRIVIAL_TEST, limits)
    assert r.passed == 0 and "sandbox blocked writing" in r.reason
    assert not os.path.exists(on_host)


@pytest.mark.parametrize("code", ["import os\nos.remove('/etc/hostname')", "import os\nos.rename('/etc/hostname', 'h')",
                                  "import os\nos.mkdir('/grpo_pwned')", "import os\nos.chmod('/etc', 0o777)",
                                  "import os\nos.symlink('/etc', 'etc')", "import os\nos.link('/etc/hostname', 'h')",
                                  "import os\nos.open('/etc/grpo_pwned', os.O_WRONLY | os.O_CREAT)",
                                  "import os\nos.chdir('/')", "import shutil\nshutil.rmtree('/grpo_pwned')",
                                  "import os\nfd = os.open('/etc', os.O_RDONLY)\nos.open('x', os.O_CREAT, dir_fd=fd)"])
def test_changing_files_outside_is_blocked(code):
    r = run_untrusted(code, TRIVIAL_TEST, LIMITS)
    assert r.passed == 0 and "sandbox blocked" in r.reason, r.reason


@HOSTILE
def test_reading_an_environment_secret(monkeypatch, limits):
    monkeypatch.setenv("GRPO_SANDBOX_TEST_SECRET", "hunter2-env")
    code = ("import os\nleaked = os.environ.get('GRPO_SANDBOX_TEST_SECRET', '')\n"
            f"for path in ['/proc/{os.getpid()}/environ', '/proc/self/environ', os.path.expanduser('~/.netrc')]:\n"
            "    try:\n        leaked += open(path).read()\n    except OSError as e:\n        print(e)\n"
            "print(leaked)\nassert 'hunter2' in leaked, 'no secret found'")
    r = run_untrusted(code, TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason == "solution raised AssertionError: no secret found"
    assert "hunter2" not in r.output and "sandbox blocked reading" in r.output


@HOSTILE
def test_opening_a_network_connection(limits):
    code = "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 80))"
    r = run_untrusted(code, TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason == "solution raised PermissionError: sandbox blocked socket.__new__"
    code = "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)"
    r = run_untrusted(code, TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason.startswith("solution raised")


def test_printing_100_mb():
    limits = SandboxLimits(timeout_s=3.0, cpu_s=3)  # building 100 MB takes ~0.5 s on a slow VM
    r = run_untrusted("import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()", TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason == f"output limit: printed more than {limits.max_output_bytes} bytes"
    assert len(r.output) <= limits.max_output_bytes
    r = run_untrusted("while True:\n    print('spam' * 1000)", TRIVIAL_TEST, LIMITS)
    assert r.passed == 0 and r.reason.startswith("output limit")


@HOSTILE
def test_killing_the_parent(victim, limits):
    me = os.getpid()
    for code in ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                 f"import os, signal\nos.kill({me}, signal.SIGKILL)",
                 f"import os, signal\nos.killpg({os.getpgid(0)}, signal.SIGKILL)",
                 f"import os, signal\nos.kill({victim.pid}, signal.SIGTERM)",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)",
                 "import signal, threading\nsignal.pthread_kill(threading.main_thread().ident, signal.SIGKILL)",
                 f"import os\nos.pidfd_open({me})"]:
        r = run_untrusted(code, TRIVIAL_TEST, limits)
        assert r.passed == 0 and r.reason.startswith("solution raised"), (code, r.reason)
        assert "sandbox blocked" in r.reason or "pidfd_open" in r.reason
    assert victim.poll() is None  # and this process is still running this line


def test_ctypes_and_introspection_escapes_are_blocked():
    for code in ["import ctypes", "import _ctypes", "import gc\ngc.get_objects()",
                 "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))"]:
        r = run_untrusted(code, TRIVIAL_TEST, LIMITS)
        assert r.passed == 0 and "sandbox blocked" in r.reason, (code, r.reason)


# ----------------------------------------------------------------------------------------------
# the kernel layers alone (audit hook off), where this platform has them
# ----------------------------------------------------------------------------------------------


def require(layer: str) -> None:
    if not any(x.startswith(layer) for x in layers(NO_HOOK)):
        pytest.skip(f"this platform gives no {layer!r} layer (see the sandbox module docstring)")


def test_kernel_network_namespace():
    require("netns")
    r = run_untrusted("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 0 and "Network is unreachable" in r.reason


def test_kernel_pid_namespace_kills_escaped_fork_bomb():
    require("pidns")
    code = ("import os, time\nprint(os.getcwd(), flush=True)\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            "            os.setsid()\n            time.sleep(1000)\n    except OSError:\n        time.sleep(0.01)")
    r = run_untrusted(code, TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 0 and "time limit" in r.reason
    workdir = r.output.strip()
    assert workdir
    deadline = time.monotonic() + 2.0  # the kernel tears the namespace down asynchronously
    while processes_mentioning(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(workdir) == []


def test_kernel_layers_protect_other_processes(victim):
    require("pidns")
    r = run_untrusted(f"import os\nos.kill({victim.pid}, 9)", TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 0 and "ProcessLookupError" in r.reason  # not even visible
    assert victim.poll() is None


def test_kernel_uid_drop_protects_files(tmp_path):
    require("uid=")
    r = run_untrusted(f"print(open('/proc/{os.getpid()}/environ').read())", TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 0 and "Permission denied" in r.reason
    r = run_untrusted(f"open({str(tmp_path / 'pwned')!r}, 'w')", TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 0 and "Permission denied" in r.reason and not (tmp_path / "pwned").exists()


def test_kernel_memory_limit():
    r = run_untrusted("x = bytearray(10 * 1024**3)", TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 0 and r.reason == "solution raised MemoryError"


# ----------------------------------------------------------------------------------------------
# the harness: bounded pool, deadlines, never raises
# ----------------------------------------------------------------------------------------------


def test_run_many_is_bounded_and_ordered():
    jobs = [(f"import time\ntime.sleep(0.5)\nN = {i}", [f"assert N == {i}"]) for i in range(4)]
    start = time.monotonic()
    results = run_many(jobs, SandboxLimits(timeout_s=3.0), max_workers=2)
    assert [r.passed for r in results] == [1, 1, 1, 1]
    assert time.monotonic() - start >= 1.0  # 4 programs of 0.5 s, two at a time


def test_run_many_deadline():
    jobs = [("while True:\n    pass", TRIVIAL_TEST)] * 5
    start = time.monotonic()
    results = run_many(jobs, SandboxLimits(timeout_s=10.0, cpu_s=10), max_workers=2, deadline_s=1.0)
    assert time.monotonic() - start < 2.5
    assert all(r.passed == 0 for r in results)
    assert sum(r.reason.startswith("not run") for r in results) >= 1


def test_harness_failure_is_a_result_not_an_exception(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no more processes")

    monkeypatch.setattr(sandbox.subprocess, "Popen", broken)
    r = run_untrusted("x = 1", TRIVIAL_TEST, LIMITS)
    assert r.passed == 0 and r.reason == "harness error: OSError: no more processes"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="memory_mb=16 is too small"):
        SandboxLimits(memory_mb=16)


def test_the_trainers_timeout_still_reaches_it(monkeypatch):
    # rewards._call_with_timeout interrupts a slow reward function with TimeoutError (SIGALRM)
    def interrupted(*args, **kwargs):
        raise TimeoutError

    monkeypatch.setattr(sandbox, "_collect", interrupted)
    with pytest.raises(TimeoutError):
        run_untrusted("while True:\n    pass", TRIVIAL_TEST, LIMITS)
    assert processes_mentioning("sandbox.py --child") == []


def test_no_temp_dirs_or_sandbox_processes_left_behind():
    before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_sandbox_")}
    run_many([("while True:\n    pass", TRIVIAL_TEST), ("x = 1", TRIVIAL_TEST)], LIMITS)
    after = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_sandbox_")}
    assert after <= before
    assert processes_mentioning("sandbox.py --child") == []


def test_signal_handlers_of_this_process_are_untouched():
    handler = signal.getsignal(signal.SIGALRM)
    run_untrusted("x = 1", TRIVIAL_TEST, LIMITS)
    assert signal.getsignal(signal.SIGALRM) is handler
    assert sys.executable  # still here
