"""Code tasks: the synthetic "functions" task (references pass, wrong programs score the fraction worked out by
hand, held-out problems never trained on, deterministic), HumanEval and MBPP rows as they ship, the cpu-code and
colab-t4-code presets, and evaluation's pass rate."""

import ast
import json
from pathlib import Path

import pytest

from grpo_lib import data, verify
from grpo_lib.config import GRPOConfig
from grpo_lib.eval import correctness, is_code_task
from grpo_lib.rewards import reward_inputs

ROOT = Path(__file__).resolve().parent.parent
# generous: the whole call's bound, and this machine is shared with other test runs
REWARD = verify.make_code_tests_reward(batch_timeout_s=240.0)


def block(code: str) -> str:
    return f"```python\n{code}\n```"


def problem(question_start: str) -> dict:
    return next(p for p in data.code_problems() if p["question"].startswith(question_start))


# ----------------------------------------------------------------------------------------------
# the "functions" task
# ----------------------------------------------------------------------------------------------


def test_every_reference_solution_passes_all_its_tests():
    problems = data.code_problems()
    assert len(problems) == sum(len(ks) for _, ks in data.CODE_FAMILIES.values()) == 588
    assert len({p["question"] for p in problems}) == len(problems)
    assert REWARD([p["solution"] for p in problems], tests=[p["tests"] for p in problems]) == [1.0] * len(problems)


def test_tests_say_what_the_question_asks():
    """times_3_plus_5: three asserts times_3_plus_5(x) == 3 x + 5, read back from the strings (not from the
    generator)."""
    p = problem("Write a Python function `times_3_plus_5(x)`")
    assert p["question"] == "Write a Python function `times_3_plus_5(x)` that returns x multiplied by 3, plus 5."
    assert len(p["tests"]) == 3
    for t in p["tests"]:
        compare = ast.parse(t).body[0].test
        assert ast.unparse(compare.left.func) == "times_3_plus_5"
        x, y = ast.literal_eval(compare.left.args[0]), ast.literal_eval(compare.comparators[0])
        assert y == 3 * x + 5
    p = problem("Write a Python function `first_3(xs)`")
    assert p["question"] == "Write a Python function `first_3(xs)` that returns the first 3 elements of the list xs."


# Wrong programs and the share of tests they pass, worked out from each family's test design (three inputs):
#   above_k:   [k + a, k - b, k]                 `x >= k` is wrong only at x == k           -> 2/3
#   is_divisible_by_k: [multiple, non-multiple, multiple]   `True` always               -> 2/3
#   count_k:   [[k, 1, k, 2], [m, m] (m != k), [k] * r]      `0` always: right on [m, m] -> 1/3
#   first_k:   lists of length k + 2, k, k - 1   `xs[:k - 1]` is right only on the shortest -> 1/3
#   repeat_k:  two non-empty strings and ""      `s * (k + 1)`: right only on ""            -> 1/3
#   minus_k, times_a_plus_b: three inputs     `x - k - 1`, `a x + b - 1`, a wrong name, NotImplementedError -> 0
WRONG = [
    ("above_40", "def above_40(x):\n    return x >= 40", 2 / 3),
    ("is_divisible_by_7", "def is_divisible_by_7(x):\n    return True", 2 / 3),
    ("count_5", "def count_5(xs):\n    return 0", 1 / 3),
    ("first_4", "def first_4(xs):\n    return xs[:3]", 1 / 3),
    ("repeat_3", "def repeat_3(s):\n    return s * 4", 1 / 3),
    ("minus_9", "def minus_9(x):\n    return x - 10", 0.0),
    ("times_3_plus_5", "def times_3_plus_5(x):\n    return x * 3 + 4", 0.0),
    ("minus_9", "def minus(x):\n    return x - 9", 0.0),
    ("minus_9", "def minus_9(x):\n    raise NotImplementedError", 0.0),
]


def test_wrong_programs_score_the_fraction_worked_out_by_hand():
    rows = [problem(f"Write a Python function `{name}(") for name, _, _ in WRONG]
    got = REWARD([block(code) for _, code, _ in WRONG], tests=[r["tests"] for r in rows])
    assert got == pytest.approx([share for _, _, share in WRONG])
    # the same programs as an unclosed block (cut off by max_completion_length) run nothing
    assert REWARD(["```python\n" + WRONG[0][1]], tests=[rows[0]["tests"]]) == [0.0]


def test_held_out_problems_are_never_trained_on():
    train = data.code_rows(3000, "train")
    test = data.code_rows(120, "test")
    test_questions = {r["question"] for r in test}
    assert len(test_questions) == 120  # every held-out problem once: 64+ for evaluation
    assert not test_questions & {r["question"] for r in train}
    assert all(data.synthetic_split(q) == "test" for q in test_questions)
    assert {r["family"] for r in test[:16]} == set(data.CODE_FAMILIES)  # families take turns


def test_rows_are_deterministic_given_a_seed_and_carry_the_prompt():
    a, b = data.code_rows(40, "train", seed=1), data.code_rows(40, "train", seed=1)
    assert a == b and a != data.code_rows(40, "train", seed=2)
    r = data.code_rows(1, "test", one_shot=True)[0]
    assert [m["role"] for m in r["prompt"]] == ["system", "user", "assistant", "user"]
    assert r["prompt"][0]["content"] == data.CODE_SYSTEM_PROMPT and r["prompt"][-1]["content"] == r["question"]
    assert [m["role"] for m in data.code_rows(1, "test", one_shot=False)[0]["prompt"]] == ["system", "user"]
    config = GRPOConfig.preset("cpu-code")
    assert data.task_rows(config, "test") == data.code_rows(64, "test", one_shot=config.one_shot)


def test_the_one_shot_example_is_no_problem_of_the_task():
    assert data.CODE_EXAMPLE[0] not in {p["question"] for p in data.code_problems()}
    assert REWARD([data.CODE_EXAMPLE[1]], tests=[["assert triple(4) == 12", "assert triple(-1) == -3"]]) == [1.0]


# ----------------------------------------------------------------------------------------------
# evaluation's pass rate
# ----------------------------------------------------------------------------------------------


def test_evaluation_reports_tests_passed_on_code_rows():
    rows = [problem("Write a Python function `above_40(x)`")]
    rows = [{**rows[0], "prompt": data.make_messages(rows[0]["question"])}]
    texts = [rows[0]["solution"], block(WRONG[0][1]), "no code"]
    inputs = reward_inputs(rows, texts, 3)
    assert is_code_task(inputs["columns"])
    assert correctness(inputs) == pytest.approx([1.0, 2 / 3, 0.0])
    answer_rows = [{"prompt": "Which is larger, 3 or 5?", "answer": "5"}]
    inputs = reward_inputs(answer_rows, ["<answer>5</answer>", "<answer>3</answer>"], 2)
    assert not is_code_task(inputs["columns"]) and correctness(inputs) == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# HumanEval and MBPP rows, unchanged
# ----------------------------------------------------------------------------------------------


def test_humaneval_rows_are_kept_as_shipped_and_split_for_good():
    raw = data.load_humaneval_raw()
    assert len(raw) == 164 and all(tuple(r) == data.HUMANEVAL_COLUMNS for r in raw)
    assert raw[0]["task_id"] == "HumanEval/0" and raw[0]["entry_point"] == "has_close_elements"
    train, test = data.load_task("humaneval", "train"), data.load_task("humaneval", "test")
    assert len(train) + len(test) == 164 and not {r["task_id"] for r in train} & {r["task_id"] for r in test}
    assert len(test) == 33 and data.load_task("humaneval", "test", n=64) == data.load_task("humaneval", "test", n=64)


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    rows = data.load_humaneval_raw()[:6]
    columns = {k: [r[k] for r in rows] for k in ("test", "entry_point")}
    prompts = [r["prompt"] for r in rows]
    assert REWARD([r["canonical_solution"] for r in rows], prompts=prompts, **columns) == [1.0] * 6
    stub = "    raise NotImplementedError\n"
    assert REWARD([stub] * 6, prompts=prompts, **columns) == [0.0] * 6


def test_mbpp_rows_keep_their_columns_and_score():
    raw = [{"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
            "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
            "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                          "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
            "test_setup_code": "", "challenge_test_list": []}]
    row = data.mbpp_rows("test", raw=raw)[0]
    assert {k: row[k] for k in raw[0]} == raw[0]
    question = row["prompt"][-1]["content"]
    assert raw[0]["text"] in question and raw[0]["test_list"][1] in question
    columns = {"test_list": [row["test_list"]] * 2, "test_setup_code": [row["test_setup_code"]] * 2}
    wrong = "def similar_elements(a, b):\n    return (3,)"  # right on neither test: {3} != {4, 5}, {3} != {3, 4}
    assert REWARD([block(raw[0]["code"]), block(wrong)], **columns) == [1.0, 0.0]
    with pytest.raises(data.DataError, match="MBPP row 0: needs 'text'"):
        data.mbpp_rows("test", raw=[{"test_list": []}])


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu-code", "colab-t4-code"])
def test_presets_validate_and_match_their_yaml(name):
    config = GRPOConfig.preset(name)
    assert GRPOConfig.from_yaml(str(ROOT / "configs" / f"{name}.yaml")) == config
    assert "code_tests" in config.reward_funcs and config.task in ("functions", "humaneval")


def test_cpu_code_runs_on_the_embedded_model_and_t4_code_fits_a_t4():
    from grpo_lib import memory
    from grpo_lib.cli import main

    cpu = GRPOConfig.preset("cpu-code")
    assert cpu.model == "smollm2-135m" and not cpu.load_in_4bit and cpu.num_eval_prompts >= 64
    t4 = GRPOConfig.preset("colab-t4-code")
    assert t4.load_in_4bit and t4.lora_r > 0 and t4.model == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    report = memory.estimate(t4, t4.model)
    assert report.fits and report.device_bytes == memory.T4_REPORTED_BYTES
    assert main(["plan", "--preset", "colab-t4-code"]) == 0


@pytest.mark.slow
def test_colab_t4_code_trains_on_cpu_with_the_embedded_model(tmp_path):
    """The colab-t4-code path (nf4 + LoRA, gradient checkpointing, fp16 with loss scaling, HumanEval rows scored by
    their own check functions) for two steps, the embedded model standing in for Qwen2.5-Coder; fp16 products are
    computed as a T4's tensor cores do (tests/fp16_matmuls.py)."""
    from grpo_lib.cli import main
    from tests.fp16_matmuls import Fp16MatmulsInFloat32

    cuts = ["model=smollm2-135m", "dtype=float16", "prompts_per_step=1", "num_generations=4",
            "max_completion_length=16", "num_eval_prompts=1", "save_steps=0"]
    with Fp16MatmulsInFloat32():
        assert main(["train", "--preset", "colab-t4-code", "--steps", "2", "--run-dir", str(tmp_path),
                     *[a for c in cuts for a in ("--set", c)]]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["load_in_4bit"] and config["gradient_checkpointing"] and config["task"] == "humaneval"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:  # each completion's reward is its HumanEval row's own check, run again here
        G = r["num_generations"]
        assert r["reward_names"] == ["code_tests"] and G == 4 and len(r["completions"]) == G
        columns = {k: [v for v in r["columns"][k] for _ in range(G)] for k in ("test", "entry_point")}
        prompts = [p for p in r["columns"]["prompt"] for _ in range(G)]
        assert [v for v, in r["rewards"]] == REWARD(r["completions"], prompts=prompts, **columns)
    before = json.loads((tmp_path / "eval_before.json").read_text())
    assert before["task_kind"] == "code" and before["samples"] == 2
