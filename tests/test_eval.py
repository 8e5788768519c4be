"""evaluate: measures computed from the same rewards the trainer uses, reproducible, RNG untouched."""

import torch

from grpo_lib.eval import comparison_table, evaluate
from grpo_lib.rewards import answer_reward, format_reward

ROWS = [{"prompt": f"<|im_start|>user\nWhich is larger, {a} or {b}?<|im_end|>\n<|im_start|>assistant\n",
         "answer": str(max(a, b))} for a, b in ((12, 40), (77, 31), (50, 51))]


def test_evaluate_is_reproducible_and_leaves_rng_alone(tiny_model, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = evaluate(tiny_model, tokenizer, ROWS, max_completion_length=5, num_samples=2)
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate(tiny_model, tokenizer, ROWS, max_completion_length=5, num_samples=2)
    assert a["completions"] == b["completions"] and a["samples"] == 6 and a["n"] == 3
    answers = [r["answer"] for r in ROWS for _ in range(2)]
    assert a["format"] == sum(format_reward(None, a["completions"])) / 6
    assert a["accuracy"] == sum(v or 0 for v in answer_reward(None, a["completions"], answer=answers)) / 6
    greedy = evaluate(tiny_model, tokenizer, ROWS, max_completion_length=5, temperature=None)
    assert greedy["samples"] == 3


def test_comparison_table():
    before = {"n": 64, "samples": 128, "format": 0.5, "accuracy": 0.25, "reward/mean": 0.75}
    after = {"n": 64, "samples": 128, "format": 0.75, "accuracy": 0.5, "reward/mean": 1.25}
    table = comparison_table(before, after)
    assert "correct answer" in table and "+0.250" in table and "+0.500" in table
