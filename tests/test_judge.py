"""Tests that call grpo_lib.judge directly: the expected values of a test stay in the parent, and the judge
reads back what the sandbox's child encodes. The verdicts themselves, honest and hacked, are tested end to end
through sandbox.run_untrusted in tests/test_sandbox.py."""

from grpo_lib import judge, sandbox


def nested(depth: int) -> list:
    """A plain value: `depth` lists, one inside the other."""
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def test_expected_values_never_enter_the_program_process():
    plan = judge._plan_test("assert add(1, 2) == 12345")
    assert plan.steps == [["eval", [[0, "add(1, 2)"]]]]
    plan = judge._plan_test("xs = [3, 1]\nassert abs(f(xs) - 98.76) < 1e-9 and sorted(g()) == [5, 6]")
    assert "98.76" not in str(plan.steps) and "[5, 6]" not in str(plan.steps)


def test_the_judge_reads_back_what_the_child_encodes():
    # the child runs sandbox.py alone (python -I -S) and cannot import grpo_lib.judge, so both modules define
    # the constants of the wire format between them: they must agree
    assert judge._METHOD_GUARD == sandbox._METHOD_GUARD and judge._MAX_DEPTH == sandbox._MAX_DEPTH
    assert sandbox._METHOD_GUARD + "(s, 'pop')" in str(judge._plan_test("assert s.pop() == 3").steps)
    encode = sandbox._make_encoder()
    for value in [{"a": (1, 2.5, 1 + 2j, b"\x00"), None: [True, "é"], 3: {1, 2}, (4, 5): frozenset({6})},
                  nested(sandbox._MAX_DEPTH)]:
        text = encode(value)
        assert text[0] == "=", text
        assert judge._canon(judge._decode(text[1:])) == judge._canon(value)
    assert encode(nested(sandbox._MAX_DEPTH + 1)) == f"#containers nested more than {sandbox._MAX_DEPTH} deep"
