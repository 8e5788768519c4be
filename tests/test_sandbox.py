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

from grpo_lib.rewards import RewardTimeout
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
# reward hacking: the asserts are judged outside the program, on plain values it sends back
# ----------------------------------------------------------------------------------------------

ALWAYS_EQUAL = "class A:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n        return False\n"
NOT_PLAIN = "not plain data: its own __eq__, __bool__ or __hash__ never decides a test"

# (name, program, tests, what the first failure's reason must contain); every test of each must fail
HACKS = [
    ("__eq__ always True", ALWAYS_EQUAL + "def add(a, b):\n    return A()",
     ["assert add(1, 2) == 3"], "test 0: AssertionError (the program answered with A, " + NOT_PLAIN),
    ("__ne__ always False", ALWAYS_EQUAL + "def add(a, b):\n    return A()",
     ["assert not add(1, 2) != 3"], "the program answered with A, " + NOT_PLAIN),
    ("__bool__ always True", "class T:\n    def __bool__(self):\n        return True\ndef is_prime(n):\n    return T()",
     ["assert is_prime(7)", "assert is_prime(8)", "assert all(is_prime(p) for p in [2, 3])",
      "assert all(map(is_prime, [2, 3]))", "assert any([is_prime(4)])"],
     "TypeError: the truth value of the program's T is not plain data (a custom __bool__ could fake it)"),
    ("__eq__ returns a truthy non-bool", "class T:\n    def __eq__(self, o):\n        return 'yes'\n"
     "def add(a, b):\n    return T()", ["assert add(1, 2) == 3"], "answered with T, " + NOT_PLAIN),
    ("int subclass with __eq__", "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
     "def add(a, b):\n    return I(0)", ["assert add(1, 2) == 3", "assert type(add(1, 2)) is int"],
     "answered with I (a subclass of int), " + NOT_PLAIN),
    ("str subclass with __eq__", "class S(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__\n"
     "def f():\n    return S('x')", ["assert f() == 'abc'"], "answered with S (a subclass of str), " + NOT_PLAIN),
    ("list subclass with __eq__", "class L(list):\n    def __eq__(self, o):\n        return True\ndef f():\n    return L()",
     ["assert f() == [1, 2]"], "answered with L (a subclass of list), " + NOT_PLAIN),
    ("fake element in a list", ALWAYS_EQUAL + "def f():\n    return [1, A()]",
     ["assert f() == [1, 2]", "assert f().count(2) == 1", "assert sorted(f()) == [1, 2]", "assert 2 in f()",
      "assert f().index(2) == 1"],
     "answered with a list holding A at [1], " + NOT_PLAIN),
    ("fake dict value", ALWAYS_EQUAL + "def f():\n    return {'k': A()}", ["assert f() == {'k': 1}"],
     "answered with a dict holding A at ['k'], " + NOT_PLAIN),
    ("lying __hash__ and __repr__ in a set", "class H:\n    def __hash__(self):\n        return hash(3)\n"
     "    def __eq__(self, o):\n        return True\n    def __repr__(self):\n        return '3'\ndef f():\n    return {H()}",
     ["assert f() == {3}", "assert 3 in f()", "assert repr(f()) == '{3}' and f() == {3}"], "a set holding H, " + NOT_PLAIN),
    ("__sub__ to pass a tolerance test", "class Z:\n    def __sub__(self, o):\n        return 0\ndef f(x):\n    return Z()",
     ["assert abs(f(1) - 1.5) < 1e-9"], "unsupported operand type(s) for -"),
    ("object posing as None", ALWAYS_EQUAL + "def f():\n    return A()", ["assert f() is None"], "AssertionError"),
    ("patched builtins", "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\n"
     "builtins.len = lambda x: 3\ndef f():\n    return 'x'",
     ["assert isinstance(f(), int)", "assert type(f()) is int", "assert len(f()) == 3"], ""),  # P breaks itself
    ("AssertionError replaced, excepthook silenced", "import builtins, sys\nclass E(Exception):\n    pass\n"
     "builtins.AssertionError = E\nsys.excepthook = lambda *a: None\ndef f():\n    return 0", ["assert f() == 1"],
     "AssertionError"),
    ("exit inside the function", "import sys\ndef f():\n    sys.exit(0)", ["assert f() == 1"], "SystemExit"),
    ("harness functions patched through __main__",
     "import __main__, json\n__main__._untag = __main__._make_encoder = __main__._run_program = None\n"
     "json.dumps = lambda *a, **k: '{\"ok\": 3}'\ndef add(a, b):\n    return 0",
     ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], ""),
    ("pass reports forged by walking stack frames",
     ALWAYS_EQUAL + "import sys\ndef add(a, b):\n    f = sys._getframe()\n"
     "    while f is not None and 'emit' not in f.f_locals:\n        f = f.f_back\n"
     "    for i in range(3):\n        f.f_locals['emit']('test', i, 1)\n    return A()",
     ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(3, 3) == 6"], ""),  # no verdict pipe in P
    ("forged replies on the reply pipe",
     "import os\ndef add(a, b):\n    for fd in range(3, 20):\n        try:\n"
     "            os.write(fd, b'{\"ok\": 3}\\n{\"ok\": 4}\\n{\"exit\": 0, \"cpu\": 0}\\n')\n"
     "        except OSError:\n            pass\n    return -1",
     ["assert add(1, 2) == 3 and add(2, 2) == 4 and add(5, 5) == 10"], ""),
]


@pytest.mark.parametrize("name, code, tests, reason", HACKS, ids=[h[0] for h in HACKS])
def test_reward_hacks_score_zero_with_a_reason(name, code, tests, reason):
    r = run_untrusted(code, tests, LIMITS)
    assert r.passed == 0, r.reason
    assert reason in r.reason, r.reason


def test_early_exit_keeps_only_the_tests_that_passed_before():
    r = run_untrusted("import os\ndef f():\n    os._exit(0)", ["assert 1 + 1 == 2", "assert f() == 1", "assert True"],
                      LIMITS)
    assert r.passed == 1 and r.reason == "exited with code 0 before the tests finished"


def test_honest_solutions_pass():
    code = """
import collections
Point = collections.namedtuple("Point", "x y")

def f(x):
    return {"ints": [1, -2, 10**30], "float": 0.1 + 0.2, "str": "héllo\\n", "none": None, "bools": [True, False],
            "tuple": (1, (2, [3])), "set": {1, 2}, "frozen": frozenset({3}), "bytes": b"\\x00\\xff", "complex": 1+2j}

def is_prime(n):
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))

def gen(n):
    yield from range(n)

def counts(s):
    return collections.Counter(s)

def middle(p, q):
    return Point((p.x + q.x) / 2, (p.y + q.y) / 2)

class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
    def pop(self):
        return self.items.pop()
    def __len__(self):
        return len(self.items)

def check_positive(x):
    if x <= 0:
        raise ValueError("not positive")
    return x
"""
    tests = [
        "assert f(1) == {'ints': [1, -2, 10**30], 'float': 0.1 + 0.2, 'str': 'héllo\\n', 'none': None, "
        "'bools': [True, False], 'tuple': (1, (2, [3])), 'set': {1, 2}, 'frozen': frozenset({3}), "
        "'bytes': b'\\x00\\xff', 'complex': 1+2j}",
        "assert f(1)['ints'][0] == 1 and f(1)['ints'][-1] == 10**30",
        "assert abs(f(1)['float'] - 0.3) < 1e-9",
        "import math\nassert math.isclose(f(1)['float'], 0.3)",
        "assert f(1)['none'] is None and f(1)['bools'][0] is True",
        "assert 2 in f(1)['set'] and 5 not in f(1)['set'] and 'ints' in f(1)",
        "assert f(1)['set'] == frozenset({1, 2}) and f(1)['str'].startswith('hé')",
        "assert type(f(1)['float']) is float and isinstance(f(1)['ints'], list)",
        "assert len(f(1)) == 10 and sorted(f(1))[0] == 'bools'",
        "assert is_prime(7)",
        "assert not is_prime(8)",
        "assert is_prime(2) == True and is_prime(9) is False",
        "assert [is_prime(n) for n in range(5)] == [False, False, True, True, False]",
        "assert all(is_prime(p) for p in [2, 3, 5, 7])",
        "assert all(map(is_prime, [2, 3, 5])) and not any(map(is_prime, [4, 6]))",
        "assert list(gen(3)) == [0, 1, 2] and sum(gen(4)) == 6",
        "assert counts('abca') == {'a': 2, 'b': 1, 'c': 1}",
        "assert dict(counts('abca')) == {'a': 2, 'b': 1, 'c': 1}",  # Counter, OrderedDict... arrive as dicts
        "assert middle(Point(0, 0), Point(2, 4)) == (1.0, 2.0)",
        "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert len(s) == 1\nassert s.items == [1]",
        "import math\nxs = [4, 9]\nassert [math.sqrt(x) for x in xs] == [2, 3]",
        "try:\n    check_positive(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')",
        "assert check_positive(5) == 5.0",  # 5 == 5.0: numbers compare by value
    ]
    r = run_untrusted(code, tests, SandboxLimits(timeout_s=5.0, cpu_s=4))
    assert r.reason == f"ok: {len(tests)}/{len(tests)} tests passed"


def test_equality_is_pythons_on_plain_values():
    # the test code runs as the datasets' own harnesses run it: Python's == on the plain values that came back
    code = "def f(x):\n    return x"
    cases = [  # (test, passes)
        ("assert f(True) == 1", True),
        ("assert f(1) == 1.0", True),
        ("assert f([1, 2]) == (1, 2)", False),
        ("assert f({1: 'a'}) == {1.0: 'a'}", True),
        ("assert f('1') == 1", False),
        ("assert f(b'a') == 'a'", False),
        ("assert f(None) == 0", False),
        ("assert f({1, 2}) == frozenset({2, 1})", True),
        ("assert f(1) != 2", True),
        ("assert f((1, [2, {3: b'x'}])) == (1, [2, {3: b'x'}])", True),
    ]
    r = run_untrusted(code, [t for t, _ in cases], LIMITS)
    assert r.passed == sum(ok for _, ok in cases), r.reason
    assert r.failures == [f"test {i}: AssertionError" for i, (_, ok) in enumerate(cases) if not ok]


@pytest.mark.parametrize("test", [
    "for x in range(3):\n    assert f(x) == x",
    "def check(candidate):\n    assert candidate(1) == 1\ncheck(f)",
    "if f(1) != 1:\n    raise AssertionError",
    "assert all(f(x) == x for x in range(3))",
    "import operator\nassert operator.eq(f(1), 1)",
    "import math, random\nrng = random.Random(4)\nfor _ in range(50):\n    x = rng.random()\n"
    "    assert math.isclose(f(x), x)",
    "assert [y for y in map(f, range(5)) if y % 2] == [1, 3]",
])
def test_tests_written_as_datasets_write_them(test):
    # helpers, loops, comprehension filters, all(), operator.eq: the test code runs unchanged, outside
    r = run_untrusted("def f(x):\n    return x", [test, "assert f(2) == 3"], LIMITS)
    assert r.passed == 1 and r.failures == ["test 1: AssertionError"], r.reason
    hacked = run_untrusted(ALWAYS_EQUAL + "def f(x):\n    return A()", [test], LIMITS)
    assert hacked.passed == 0, hacked.reason


def test_a_test_that_does_not_compile_fails_alone():
    r = run_untrusted("def f(x):\n    return x", ["assert (", "assert f(2) == 2"], LIMITS)
    assert r.passed == 1 and r.failures[0].startswith("test 0: SyntaxError"), r.reason


def test_values_too_large_or_deep_are_refused():
    code = "def deep():\n    x = []\n    for _ in range(100):\n        x = [x]\n    return x\ndef big():\n    return 'x' * 2_000_000"
    r = run_untrusted(code, ["assert deep() == []", "assert big() == ''", "assert 2 ** len(str(10 ** 4)) > 0",
                             "assert 2 ** (10 ** 7) > 0"], SandboxLimits(timeout_s=5.0, cpu_s=4))
    assert r.passed == 2, r.reason
    assert r.failures[:2] == [
        "test 0: ValueError: the program's answer cannot be sent back: containers nested more than 40 deep",
        "test 1: ValueError: the program's answer cannot be sent back: too large to send (2000002 characters, "
        "over 1000000)"]


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

    monkeypatch.setattr(sandbox._FORK_SERVER, "submit", broken)
    r = run_untrusted("x = 1", TRIVIAL_TEST, LIMITS)
    assert r.passed == 0 and r.reason == "harness error: OSError: no more processes"


def test_a_dead_fork_server_is_started_again():
    run_untrusted("x = 1", TRIVIAL_TEST, LIMITS)
    os.kill(sandbox._FORK_SERVER.pid, signal.SIGKILL)
    sandbox._FORK_SERVER._proc.wait()
    assert run_untrusted("def f():\n    return 1", ["assert f() == 1"], LIMITS).passed == 1


def test_limits_are_validated():
    with pytest.raises(ValueError, match="memory_mb=16 is too small"):
        SandboxLimits(memory_mb=16)


def test_the_trainers_timeout_still_reaches_it(monkeypatch):
    # rewards._call_with_timeout interrupts a slow reward function with RewardTimeout (SIGALRM): the client's
    # `except Exception` lets it through to the trainer and its `finally` still kills the job's processes
    def interrupted(*args, **kwargs):
        raise RewardTimeout

    real = sandbox._exchange

    def interrupted_after_start(*args, **kwargs):
        args = list(args)
        args[3] = time.monotonic() + 0.3  # read for 0.3 s (J has reported its pid), then the alarm
        real(*args, **kwargs)
        raise RewardTimeout

    monkeypatch.setattr(sandbox, "_exchange", interrupted_after_start)
    with pytest.raises(RewardTimeout):
        run_untrusted("while True:\n    pass", TRIVIAL_TEST, LIMITS)
    time.sleep(0.1)
    assert job_processes() == []


def job_processes() -> list[int]:
    """Live processes of the sandbox beyond the fork server and its idle spares (a judge and its program
    process each, waiting for a job): those of jobs that were not cleaned up."""
    time.sleep(0.2)  # the fork server replaces the spares it handed out
    others = [pid for pid in processes_mentioning("sandbox.py --fork-server") if pid != sandbox._FORK_SERVER.pid]
    return others[2 * sandbox._SPARES:]


def test_no_temp_dirs_or_sandbox_processes_left_behind():
    before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_sandbox_")}
    run_many([("while True:\n    pass", TRIVIAL_TEST), ("x = 1", TRIVIAL_TEST)], LIMITS)
    after = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_sandbox_")}
    assert after <= before
    time.sleep(0.1)
    assert job_processes() == []


def test_signal_handlers_of_this_process_are_untouched():
    handler = signal.getsignal(signal.SIGALRM)
    run_untrusted("x = 1", TRIVIAL_TEST, LIMITS)
    assert signal.getsignal(signal.SIGALRM) is handler
    assert sys.executable  # still here


# ----------------------------------------------------------------------------------------------
# containment, second red team: each finding reproduced by a test (they failed on the sandbox before the
# fork-server design; see the closing note of the change that added them)
# ----------------------------------------------------------------------------------------------

ROOT_NO_HOOK = SandboxLimits(timeout_s=2.0, cpu_s=2, audit_hook=False, sandbox_uid=None, namespaces=False)


@HOSTILE
@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_device_files_and_fifos_are_not_created_outside(where, limits):
    marker = f"{where}/grpo_sandbox_probe_{os.getpid()}"
    code = (f"import os\nfor make in (lambda p: os.mknod(p), lambda p: os.mkfifo(p)):\n    try:\n"
            f"        make({marker!r})\n    except Exception:\n        pass\n"
            f"def made():\n    return os.path.exists({marker!r})")
    try:
        r = run_untrusted(code, ["assert made() is True"], limits)
        assert not os.path.exists(marker) and r.passed == 0, r.reason
    finally:
        if os.path.exists(marker):
            os.remove(marker)


@pytest.fixture
def shared_object(tmp_path):
    """A shared object whose constructor writes a marker file: native code, loaded or not."""
    marker = tmp_path / "native_code_ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n'
                   f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("x", f); fclose(f); }}\n}}\n'
                   'void PyInit_math(void) {}\n')
    lib = tmp_path / "math.cpython-311-x86_64-linux-gnu.so"
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C compiler to build the shared object")
    tmp_path.chmod(0o777)  # readable by the sandbox user too, as a venv on Colab is
    (tmp_path / "evil.c").chmod(0o644)
    lib.chmod(0o755)
    return lib, marker


@pytest.mark.parametrize("limits", [LIMITS, HOOK_ONLY], ids=["all-layers", "hook-only"])
def test_native_code_cannot_be_loaded(shared_object, limits):
    lib, marker = shared_object
    code = (f"import importlib.util, sys\nerrors = []\n"
            f"try:\n    spec = importlib.util.spec_from_file_location('math', {str(lib)!r})\n"
            f"    importlib.util.module_from_spec(spec)\nexcept Exception as e:\n    errors.append(repr(e))\n"
            f"try:\n    import _imp\n    _imp.create_dynamic(spec)\nexcept Exception as e:\n    errors.append(repr(e))\n"
            f"sys.path.insert(0, {str(lib.parent)!r})\nsys.modules.pop('math', None)\n"
            f"try:\n    import math\nexcept Exception as e:\n    errors.append(repr(e))\n"
            f"def loaded():\n    return len(errors)")
    r = run_untrusted(code, ["assert loaded() == 0"], limits)
    assert not marker.exists(), r.reason
    assert r.passed == 0, r.reason


@HOSTILE
def test_a_fresh_posix_module_cannot_be_made(limits):
    code = ("import _imp, importlib.machinery\nfound = []\nfor name in ('posix', '_posixsubprocess', '_signal'):\n"
            "    try:\n        m = _imp.create_builtin(importlib.machinery.ModuleSpec(name, None))\n"
            "        found.append(name if hasattr(m, 'setsid') or hasattr(m, 'fork_exec') else '')\n"
            "    except Exception:\n        pass\n"
            "import os, posix\nfound += [n for n in ('setsid', 'setpgid', 'setpgrp', 'mknod', 'mkfifo') "
            "if hasattr(os, n) or hasattr(posix, n)]\n"
            "def escapes():\n    return found")
    r = run_untrusted(code, ["assert escapes() == []", "assert escapes() != []"], limits)
    assert r.passed == 1 and r.failures == ["test 1: AssertionError"], r.reason


@pytest.mark.parametrize("module", ["sqlite3", "_sqlite3", "_posixshmem", "multiprocessing.shared_memory",
                                    "_posixsubprocess", "_cffi_backend", "cffi", "mmap"])
@pytest.mark.parametrize("limits", [LIMITS, HOOK_ONLY], ids=["all-layers", "hook-only"])
def test_modules_that_open_files_from_c_cannot_be_imported(module, limits):
    # HOOK_ONLY stays root: every file of the host's Python is readable, as on Colab; containment must not
    # depend on file permissions, so the venv's site-packages are put on sys.path too
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = f"import sys\nsys.path[:0] = {site!r}\nimport {module}\n"
    r = run_untrusted(code, TRIVIAL_TEST, limits)
    assert r.passed == 0 and r.reason.startswith("solution raised"), r.reason


def test_a_2500_deep_tree_is_removed_without_recursion():
    code = ("import os\nfd = os.open('.', os.O_RDONLY)\nfor i in range(2500):\n    os.mkdir('d', dir_fd=fd)\n"
            "    nxt = os.open('d', os.O_RDONLY, dir_fd=fd)\n    os.close(fd)\n    fd = nxt\n"
            "def depth():\n    return 2500")
    before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_sandbox_")}
    r = run_untrusted(code, ["assert depth() == 2500"], SandboxLimits(timeout_s=10.0, cpu_s=8, max_open_files=64))
    assert r.passed == 1, r.reason
    assert {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("grpo_sandbox_")} <= before


def test_cleanup_does_not_follow_a_planted_symlink(tmp_path):
    target = tmp_path / "victim_dir"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    (target / "keep.txt").write_text("x")
    code = f"import os\nos.symlink({str(target)!r}, 'link')\nos.symlink({str(target / 'keep.txt')!r}, 'file')\n"
    r = run_untrusted(code, TRIVIAL_TEST, NO_HOOK)
    assert r.passed == 1, r.reason
    assert (target.stat().st_mode & 0o777) == 0o755 and (target / "keep.txt").read_text() == "x"


def test_remove_tree_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "x").write_text("1")
    (tree / "a" / "to_outside").symlink_to(outside)
    (tree / "a" / "b").chmod(0)
    sandbox.remove_tree(str(tree))
    assert not tree.exists() and (outside / "f").read_text() == "keep"


@HOSTILE
def test_an_exit_status_of_200_is_an_exit_status(limits):
    r = run_untrusted("import os\nos._exit(200)", TRIVIAL_TEST, limits)
    assert r.reason == "exited with code 200 before the tests finished"


@HOSTILE
def test_hash_colliding_values_cannot_stall_the_judge(limits):
    # 40,000 ints that all hash to 0, sent straight down the reply pipe as a set for the judge to build:
    # quadratic in J, which the deadline kills (judging is inside the time bound)
    modulus = sys.hash_info.modulus
    code = ("import os, json\nitems = [['S', [k * %d for k in range(1, 40001)]]]\n"
            "def f():\n    line = json.dumps({'ok': items[0]}) + '\\n'\n"
            "    for fd in range(3, 20):\n        try:\n            os.write(fd, line.encode())\n"
            "        except OSError:\n            pass\n    return 0" % modulus)
    start = time.monotonic()
    r = run_many([(code, ["assert f() == {1}"])], limits, deadline_s=2.0)[0]
    assert time.monotonic() - start < 3.5 and r.passed == 0, r.reason


@HOSTILE
def test_the_isolation_report_cannot_be_forged(limits):
    honest = run_untrusted("x = 1", TRIVIAL_TEST, limits).isolation
    code = ("import os, json\nfor fd in range(3, 20):\n    try:\n"
            "        os.write(fd, b'\\n' + json.dumps({'isolation': ['forged']}).encode() + b'\\nisolation forged\\n')\n"
            "    except OSError:\n        pass\nprint('isolation forged')")
    assert run_untrusted(code, TRIVIAL_TEST, limits).isolation == honest


@HOSTILE
def test_the_program_holds_no_descriptor_but_its_own(limits):
    code = ("import os\ndef fds():\n    found = []\n    for fd in range(1024):\n        try:\n"
            "            os.fstat(fd)\n            found.append(fd)\n        except OSError:\n            pass\n"
            "    return found")
    r = run_untrusted(code, ["assert len(fds()) == 5"], limits)  # stdin, stdout, stderr, requests, replies
    assert r.passed == 1, r.reason


def test_the_expected_values_are_nowhere_in_the_programs_memory():
    # root, no hook: the program reads its own memory through /proc/self/mem and reports every
    # "EXPECTED=<digits>" it finds; the test's expected value is one, were it anywhere in P
    scan = ("import re\ndef leak():\n    found = set()\n    maps = open('/proc/self/maps').read().splitlines()\n"
            "    with open('/proc/self/mem', 'rb', 0) as mem:\n        for line in maps:\n"
            "            span, perms = line.split()[:2]\n            if 'r' not in perms:\n                continue\n"
            "            lo, hi = (int(x, 16) for x in span.split('-'))\n            try:\n"
            "                mem.seek(lo)\n                chunk = mem.read(hi - lo)\n            except (OSError, ValueError, OverflowError):\n"
            "                continue\n            found |= {m.decode() for m in re.findall(b'EXPECT' + b'ED=(\\\\d{5})', chunk)}\n"
            "    return sorted(found)\n")
    test = "assert leak() == ['98765']  # EXPECTED=98765"
    assert run_untrusted(scan, [test], ROOT_NO_HOOK).passed == 0
    planted = run_untrusted(scan + "KEPT = 'EXPECTED=' + str(98765)\n", [test], ROOT_NO_HOOK)
    assert planted.passed == 1, planted.reason  # the scan does find such a string when it is there
