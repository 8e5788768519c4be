"""Tests for grpo_lib.verify: math equivalence (both backends, one table), the math reward, code
extraction, the syntax reward and the code-tests reward (which runs programs in grpo_lib.sandbox)."""

import time

import pytest

from grpo_lib import verify
from grpo_lib.rewards import RewardFunctionError, score_completions
from grpo_lib.sandbox import SandboxLimits
from grpo_lib.verify import (SUM_LIST_TASK, code_syntax_reward, code_tests_reward, extract_code,
                             extract_final_answer, make_code_tests_reward, make_math_answer_reward,
                             math_answer_reward, math_equal, math_equal_many, split_tests)

HAVE_MATH_VERIFY = verify.default_backend() == "math_verify"
needs_math_verify = pytest.mark.skipif(not HAVE_MATH_VERIFY, reason="pip install math-verify")
BACKENDS = [pytest.param("math_verify", marks=needs_math_verify), "fallback"]

# (pred, gold, percent_ok, expected): every row must hold for both backends
MATH_TABLE = [
    # fractions, decimals, LaTeX
    ("1/2", "0.5", False, True),
    ("0.5", "1/2", False, True),
    ("\\frac{1}{2}", "0.5", False, True),
    ("\\dfrac{1}{2}", "1/2", False, True),
    ("\\tfrac{1}{2}", "0.5", False, True),
    ("\\frac12", "0.5", False, True),
    ("2/4", "1/2", False, True),
    ("\\frac{3}{4}", "0.75", False, True),
    ("\\frac{10}{4}", "2.5", False, True),
    ("-\\frac{1}{2}", "-0.5", False, True),
    ("\\frac{-1}{2}", "-1/2", False, True),
    ("0.50", "\\frac{1}{2}", False, True),
    ("\\dfrac{9}{2}", "4.5", False, True),
    ("0.3333333", "1/3", False, True),
    ("\\boxed{7}", "7", False, True),
    ("\\boxed{\\frac{1}{2}}", "0.5", False, True),
    # integers written differently
    ("3.0", "3", False, True),
    ("72.00", "72", False, True),
    ("7.", "7", False, True),
    ("12.50", "12.5", False, True),
    ("-3", "-3.0", False, True),
    # assignments
    ("x=3", "3", False, True),
    ("x = 3", "3", False, True),
    ("y = -2", "-2", False, True),
    # thousands separators and money
    ("1,000", "1000", False, True),
    ("1,234,567", "1234567", False, True),
    ("1000", "1,000", False, True),
    ("1{,}000", "1000", False, True),
    ("1\\,000", "1000", False, True),
    ("$1,000", "1000", False, True),
    ("\\$18", "18", False, True),
    ("\\$1{,}000.50", "1000.5", False, True),
    ("5 \\text{ cm}", "5", False, True),
    # percent
    ("50\\%", "0.5", True, True),
    ("50%", "0.5", True, True),
    ("50\\%", "50", True, True),
    ("50%", "50", False, True),
    ("50\\%", "50", False, True),
    ("12.5%", "0.125", True, True),
    # GSM8K gold answers (text after '####', commas already removed by extract_gsm8k_gold)
    ("72", "72", False, True),
    ("$18", "18", False, True),
    ("624.0", "624", False, True),
    ("10,000", "10000", False, True),
    ("\\boxed{5}", "5", False, True),
    # not equivalent
    ("3", "4", False, False),
    ("-5", "5", False, False),
    ("0.333", "1/3", False, False),
    ("\\frac{2}{3}", "0.67", False, False),
    ("\\frac{1}{3}", "0.33", False, False),
    ("1,2", "12", False, False),
    ("2/3", "3/2", False, False),
    ("1001", "1000", False, False),
    ("1,000", "100", False, False),
    ("0.5", "5", False, False),
    ("\\frac{1}{2}", "2", False, False),
    ("x = 4", "3", False, False),
    ("72.5", "72", False, False),
    ("-18", "18", False, False),
    ("7", "77", False, False),
    ("12", "1/2", False, False),
    ("50%", "0.5", False, False),
    ("50\\%", "0.5", False, False),
    ("0.5", "50", True, False),
    ("", "3", False, False),
    ("abc", "3", False, False),
    ("17", "18", False, False),
    ("180", "18", False, False),
    ("4 or 3", "3", False, False),  # hedging earns nothing
    ("3x", "3", False, False),
    ("\\boxed{1} + \\boxed{2}", "2", False, False),
    ("0.5", "50\\%", True, True),
]

# symbolic forms that only math_verify understands
SYMBOLIC_TABLE = [
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("2\\pi", "6.28", False),
    ("x^2", "x^3", False),
]


def test_table_is_big_enough():
    assert len(MATH_TABLE) >= 40
    assert sum(row[3] for row in MATH_TABLE) >= 20 and sum(not row[3] for row in MATH_TABLE) >= 20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred,gold,percent_ok,expected", MATH_TABLE)
def test_math_equal_table(backend, pred, gold, percent_ok, expected):
    assert math_equal(pred, gold, percent_ok=percent_ok, backend=backend) is expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_math_equal_many_matches_single_calls(backend):
    pairs = [(p, g) for p, g, pct, _ in MATH_TABLE if not pct]
    expected = [e for _, _, pct, e in MATH_TABLE if not pct]
    assert math_equal_many(pairs, backend=backend) == expected


@needs_math_verify
@pytest.mark.parametrize("pred,gold,expected", SYMBOLIC_TABLE)
def test_math_verify_symbolic(pred, gold, expected):
    assert math_equal(pred, gold, backend="math_verify") is expected


@needs_math_verify
def test_math_verify_never_hangs_on_huge_numbers():
    # sympy evaluates 9^(9^(9^9)) in C, where no signal reaches it: the worker is killed and restarted
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="did not answer"):
        assert math_equal_many([("9^{9^{9^{9}}}", "1"), ("1/2", "0.5")], backend="math_verify",
                               timeout_s=1.0) == [False, True]
    assert time.monotonic() - start < 15
    assert math_equal("\\frac{1}{2}", "0.5", backend="math_verify")  # the restarted worker answers


@needs_math_verify
def test_math_verify_batch_timeout_bounds_the_call():
    math_equal("1", "1", backend="math_verify")  # worker started
    pairs = [("9^{9^{9^{9}}}", "1")] * 3 + [("1", "1")]
    start = time.monotonic()
    with pytest.warns(RuntimeWarning) as warned:
        assert math_equal_many(pairs, backend="math_verify", timeout_s=5.0, batch_timeout_s=1.0) == [False] * 4
    assert any("not done within batch_timeout_s=1.0" in str(w.message) for w in warned)
    assert time.monotonic() - start < 4.0


def test_fallback_is_used_where_math_verify_is_missing(monkeypatch):
    real_find_spec = verify.importlib.util.find_spec
    monkeypatch.setattr(verify.importlib.util, "find_spec",
                        lambda name, *a: None if name == "math_verify" else real_find_spec(name, *a))
    assert verify.default_backend() == "fallback"
    assert math_equal("\\frac{1}{2}", "0.5") and not math_equal("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        math_equal("1", "1", backend="sympy")


def test_extract_final_answer():
    assert extract_final_answer("so <answer>1</answer> no, <answer> 2 </answer>") == "2"
    assert extract_final_answer("thus \\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    assert extract_final_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_final_answer("no answer here") is None
    assert extract_final_answer("\\boxed{3") is None
    assert verify.unwrap_boxed(" \\boxed{ {1}{2} } ") == "{1}{2}"
    assert verify.unwrap_boxed("\\boxed{1} + \\boxed{2}") == "\\boxed{1} + \\boxed{2}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_math_answer_reward(backend):
    reward = make_math_answer_reward(backend=backend)
    completions = ["<think>half</think><answer>\\frac{1}{2}</answer>", "<answer>0.4</answer>", "no answer",
                   "the result is \\boxed{1,000}", [{"role": "assistant", "content": "<answer>x = 3</answer>"}],
                   "<answer>5</answer>"]
    gold = ["0.5", "0.5", "0.5", "Lots of work.\n#### 1,000", "3", None]
    assert reward(completions, answer=gold) == [1.0, 0.0, 0.0, 1.0, 1.0, None]
    assert reward(["<answer>1</answer>"]) == [None]  # no answer column: does not apply
    assert math_answer_reward.__name__ == "math_equal"


def test_math_answer_reward_percent_option():
    strict, lenient = make_math_answer_reward(), make_math_answer_reward(percent_ok=True)
    completions, gold = ["<answer>50%</answer>"], ["0.5"]
    assert strict(completions, answer=gold) == [0.0]
    assert lenient(completions, answer=gold) == [1.0]


def test_math_reward_through_score_completions():
    scores = score_completions([math_answer_reward], ["p", "p"], ["<answer>1/2</answer>", "<answer>2</answer>"],
                               columns={"answer": ["0.5", "0.5"]})
    assert scores.per_func[:, 0].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# code
# ----------------------------------------------------------------------------------------------

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2)


def test_extract_code():
    text = "first\n```python\nx = 1\n```\nthen\n```bash\nls\n```\nfinally\n```py\ny = 2\n```\n"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("```\nz = 3\n```") == "z = 3\n"
    assert extract_code("```python\ncut off by max tokens") is None
    assert extract_code("no code") is None


def test_code_syntax_reward():
    completions = ["```python\ndef f(x):\n    return x\n```", "```python\ndef f(x) return x\n```", "no code",
                   [{"role": "assistant", "content": "```python\nprint('\\d')\n```"}]]
    assert code_syntax_reward(completions) == [1.0, 0.0, 0.0, 1.0]
    assert code_syntax_reward.__name__ == "code_syntax"


def test_split_tests():
    assert split_tests(["assert f(1) == 1", "  ", "assert f(2) == 2"]) == ["assert f(1) == 1", "assert f(2) == 2"]
    assert split_tests("import math\nassert f(1) == 1\nassert f(2) == 2\n") == [
        "import math\nassert f(1) == 1", "assert f(2) == 2"]
    assert split_tests(None) == []
    assert split_tests("assert (") == ["assert ("]


def test_code_tests_reward_fraction_passed():
    reward = make_code_tests_reward(limits=FAST)
    tests = SUM_LIST_TASK["tests"]
    completions = [
        SUM_LIST_TASK["reference"],
        "```python\ndef sum_list(xs):\n    return sum(xs) if xs else 1\n```",  # fails the empty-list test
        "```python\ndef sum_list(xs):\n    return float(sum(xs))\n```",  # 6.0 == 6: numbers compare by value
        "```python\ndef sum_list(xs) return 0\n```",  # syntax error
        "I would write sum(xs).",  # no code block
        "```python\ndef sum_list(xs):\n    return 0\n```",
    ]
    rewards = reward(completions, tests=[tests] * 6)
    assert rewards == [1.0, 3 / 4, 1.0, 0.0, 0.0, 1 / 4]  # "return 0": only the empty list
    assert reward([SUM_LIST_TASK["reference"]], tests=[None]) == [None]
    assert reward([SUM_LIST_TASK["reference"]]) == [None]
    assert code_tests_reward.__name__ == "code_tests"


def test_always_equal_hack_scores_zero():
    # run naively, in this process, the hack passes every test of SUM_LIST_TASK
    ns = {}
    exec(extract_code(verify.EQ_HACK_COMPLETION), ns)
    for test in SUM_LIST_TASK["tests"]:
        exec(test, ns)
    # judged by the sandbox, on plain values, it passes none
    result = verify.score_code([verify.EQ_HACK_COMPLETION], [SUM_LIST_TASK["tests"]], FAST)[0]
    assert result.passed == 0
    assert result.reason == ("4/4 tests failed; first: test 0: result of sum_list([1, 2, 3]) is Anything, not a "
                             "plain value (a custom __eq__ could fake equality)")
    assert "type(" not in str(SUM_LIST_TASK["tests"])  # no type test needed any more


@pytest.mark.parametrize("hack", [
    # an int subclass that equals anything
    "class I(int):\n    __eq__ = lambda self, other: True\n    __hash__ = int.__hash__\n"
    "def sum_list(xs):\n    return I(0)",
    # a list subclass, a float subclass, a truthy comparison result
    "class F(float):\n    def __eq__(self, other):\n        return True\ndef sum_list(xs):\n    return F(0)",
    "class R:\n    def __bool__(self):\n        return True\nclass A:\n    def __eq__(self, other):\n        return R()\n"
    "def sum_list(xs):\n    return A()",
    # monkey-patching the builtins the tests could use, and AssertionError
    "import builtins\nbuiltins.AssertionError = Warning\nbuiltins.abs = lambda x: 0\ndef sum_list(xs):\n    return -1",
    # the test harness itself, through __main__
    "import __main__\n__main__._run_step = lambda emit, label, *a, **k: emit(label, '1') or True\n"
    "def sum_list(xs):\n    return -1",
])
def test_eq_hack_variants_score_zero(hack):
    result = verify.score_code([f"```python\n{hack}\n```"], [SUM_LIST_TASK["tests"]], FAST)[0]
    assert result.fraction == 0.0, result.reason


def test_reference_solutions_still_score_one():
    reward = make_code_tests_reward(limits=FAST)
    assert reward(prompts=["p"], completions=[SUM_LIST_TASK["reference"]], tests=[SUM_LIST_TASK["tests"]]) == [1.0]
    completion = ("```python\ndef stats(xs):\n    if not xs:\n        return None\n"
                  "    return {'n': len(xs), 'mean': sum(xs) / len(xs), 'sorted': sorted(xs), 'pair': (min(xs), max(xs)),"
                  " 'odd': [x % 2 == 1 for x in xs], 'name': 'stats'}\n```")
    tests = ["assert stats([]) is None",
             "assert stats([3, 1, 2]) == {'n': 3, 'mean': 2.0, 'sorted': [1, 2, 3], 'pair': (1, 3), "
             "'odd': [True, True, False], 'name': 'stats'}",
             "assert abs(stats([1, 2])['mean'] - 1.5) < 1e-9",
             "assert stats([5])['odd'][0]"]
    results = verify.score_code([completion], [tests], FAST)
    assert results[0].reason == "ok: 4/4 tests passed"


def test_program_cannot_shadow_builtins_used_by_tests():
    hack = "```python\ntype = lambda x: int\ndef sum_list(xs):\n    return 0.0\n```"
    results = verify.score_code([hack], [["assert type(sum_list([1])) is int"]], FAST)
    assert results[0].passed == 0


def test_code_tests_single_string_of_asserts():
    tests = "assert sum_list([1]) == 1\nassert sum_list([1, 1]) == 2\nassert sum_list([]) == 5\n"
    reward = make_code_tests_reward(limits=FAST)
    assert reward([SUM_LIST_TASK["reference"]], tests=[tests]) == [2 / 3]


def test_code_tests_reward_batch_budget_is_respected():
    reward = make_code_tests_reward(limits=SandboxLimits(timeout_s=5.0, cpu_s=5), max_workers=2,
                                    batch_timeout_s=1.5)
    loop = "```python\nwhile True:\n    pass\n```"
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="not run within batch_timeout_s"):
        rewards = reward([loop] * 6, tests=[["assert True"]] * 6)
    assert rewards == [0.0] * 6
    assert time.monotonic() - start < 4.0


def test_trainer_timeout_interrupts_the_code_reward_cleanly():
    # score_completions' own timeout (SIGALRM) fires while programs run: queued ones are dropped, running
    # ones end within their wall limit, and the trainer gets its usual error instead of a hang
    reward = make_code_tests_reward(limits=SandboxLimits(timeout_s=2.0, cpu_s=2), max_workers=2, batch_timeout_s=60)
    loop = "```python\nwhile True:\n    pass\n```"
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match="took more than reward_timeout_s=0.5s"):
        score_completions([reward], ["p"] * 8, [loop] * 8, columns={"tests": [["assert True"]] * 8}, timeout_s=0.5)
    assert time.monotonic() - start < 4.0


def test_code_tests_reward_through_score_completions():
    scores = score_completions([code_tests_reward, code_syntax_reward], ["p", "p"],
                               [SUM_LIST_TASK["reference"], "no code"],
                               columns={"tests": [SUM_LIST_TASK["tests"]] * 2}, timeout_s=30)
    assert scores.per_func.tolist() == [[1.0, 1.0], [0.0, 0.0]]
