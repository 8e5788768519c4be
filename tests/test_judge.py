"""Tests that call grpo_lib.judge directly: the wire format it shares with the sandbox's program process, the
comparisons of the datasets' harnesses, and the proxies' refusals. The verdicts themselves, honest and hacked,
are tested end to end through sandbox.run_untrusted in tests/test_sandbox.py."""

import pytest

from grpo_lib import judge, sandbox


def nested(depth: int) -> list:
    """A plain value: `depth` lists, one inside the other."""
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def test_the_judge_reads_back_what_the_program_process_encodes():
    # P runs sandbox.py (python -I -S), J runs judge.py: both must agree on the tagged form and its depth bound
    assert judge._MAX_DEPTH == sandbox._MAX_DEPTH
    encode = sandbox._make_encoder()
    for value in [{"a": (1, 2.5, 1 + 2j, b"\x00"), None: [True, "é"], 3: {1, 2}, (4, 5): frozenset({6})},
                  nested(sandbox._MAX_DEPTH), float("inf"), 10 ** 40]:
        text = encode(value)
        assert text[0] == "=", text
        decoded = judge.untag(__import__("json").loads(text[1:]))
        assert decoded == value and type(decoded) is type(value)
    assert encode(nested(sandbox._MAX_DEPTH + 1)) == f"#containers nested more than {sandbox._MAX_DEPTH} deep"


def test_arguments_travel_tagged_and_come_back_equal():
    # J tags the test's arguments; P untags them into the same builtins, references to its objects resolved
    value = {"k": [1, (2.5, None)], 3: {True, b"\xff"}, (1, 2): frozenset({"x"}), "c": 1j}
    assert judge.untag(judge.tag(value)) == value
    objects = {7: object()}
    proxy = judge.Proxy(None, ["h", 7], "A")
    assert judge.untag(judge.tag([proxy]), resolve=lambda ref: objects[ref[1]]) == [objects[7]]
    with pytest.raises(TypeError, match="a value of type object cannot be sent to the program"):
        judge.tag(object())
    with pytest.raises(ValueError, match="not an encoded value"):
        judge.untag(["H", ["g", "f"]])  # a reference means nothing on the judge's side


@pytest.mark.parametrize("output, expected, same", [
    ("6\n", "6\n", True),
    ("6", ["6"], True),                                    # APPS stores outputs as lists of lines too
    ("  1 2 \n\n3\n", "1 2\n3", True),                     # lines stripped, blank lines ignored
    ("1  2\n3", "1 2 3", True),                            # token by token
    ("0.30000000000000004\n", "0.3\n", True),              # |a - b| <= 1e-8 + 1e-5 |b|
    ("0.30001\n", "0.3\n", False),                          # 1e-5 > 1e-8 + 3e-6
    ("YES", "yes", False),
    ("nan", "nan", True),                                   # equal as text
    ("1 2", "1 2 3", False),
    (3, "3", False),                                        # only text is output
])
def test_stdout_matches_as_apps_harness(output, expected, same):
    assert judge.stdout_matches(output, expected) is same


@pytest.mark.parametrize("output, expected, same", [
    (3, [3], True),                                          # APPS wraps a single return value in a list
    ([1, 2], [[1, 2]], True),
    ((1, 2), [1, 2], True),                                  # tuples read as lists (JSON has no tuples)
    ([(1, 2)], [[1, 2]], True),
    (3, 3, True),
    (3, [4], False),
    ([3], [[3], [4]], False),
])
def test_call_output_matches_as_apps_harness(output, expected, same):
    assert judge.call_output_matches(output, expected) is same


def test_program_exceptions_become_builtin_ones_or_program_error():
    assert type(judge.program_exception("ValueError", "bad")) is ValueError
    assert type(judge.program_exception("StopIteration", "")) is StopIteration
    for name in ("SystemExit", "KeyboardInterrupt", "MyError", "os.system"):
        e = judge.program_exception(name, "x")
        assert type(e) is judge.ProgramError and str(e) == f"{name}: x"


class FakeProgram:
    """Answers every request with a handle: enough to see what a Proxy asks and refuses."""

    def __init__(self):
        self.asked = []

    def ask(self, request):
        self.asked.append(request)
        return judge.Proxy(self, ["h", len(self.asked)], "A")


def test_a_proxy_never_lets_the_program_compare_or_judge():
    program = FakeProgram()
    a = judge.Proxy(program, ["g", "f"], "f")
    assert (a == 3) is False and (a != 3) is True and a == a
    with pytest.raises(TypeError, match="truth value of the program's f is not plain data"):
        bool(a)
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError):
        a[0]
    assert hash(a) == object.__hash__(a) and repr(a) == "<the program's f>"
    assert program.asked == []  # none of that reached the program
    a(1, x=[2])
    assert program.asked == [{"op": "call", "ref": ["g", "f"], "args": ["L", [1]], "kwargs": ["D", [["x", ["L", [2]]]]]}]


def test_count_tests():
    assert judge.count_tests({"kind": "check", "test": "", "entry_point": "f"}) == 1
    assert judge.count_tests({"kind": "asserts", "tests": ["a", "b"]}) == 2
    assert judge.count_tests({"kind": "stdio", "cases": [["1", "1"]] * 3}) == 3
