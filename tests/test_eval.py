"""evaluate: measures computed from the same rewards the trainer uses, the config's sampling settings,
reproducible, and every random stream left as it was."""

import random

import numpy as np
import pytest
import torch

from grpo_lib import rng
from grpo_lib.config import GRPOConfig
from grpo_lib.eval import comparison_table, evaluate
from grpo_lib.rewards import answer_reward, format_reward

ROWS = [{"prompt": f"<|im_start|>user\nWhich is larger, {a} or {b}?<|im_end|>\n<|im_start|>assistant\n",
         "answer": str(max(a, b))} for a, b in ((12, 40), (77, 31), (50, 51))]
CONFIG = GRPOConfig(model="tiny", load_in_4bit=False, max_completion_length=5)


def test_evaluate_is_reproducible_and_leaves_rng_alone(tiny_model, tokenizer):
    torch.manual_seed(123)
    random.seed(5)
    state = rng.rng_state()
    a = evaluate(tiny_model, tokenizer, ROWS, CONFIG, num_samples=2)
    after = rng.rng_state()
    assert torch.equal(after["torch"], state["torch"]) and after["python"] == state["python"]
    assert all(np.array_equal(x, y) for x, y in zip(after["numpy"][1:2], state["numpy"][1:2]))
    b = evaluate(tiny_model, tokenizer, ROWS, CONFIG, num_samples=2)
    assert a["completions"] == b["completions"] and a["samples"] == 6 and a["n"] == 3
    answers = [r["answer"] for r in ROWS for _ in range(2)]
    assert a["format"] == sum(format_reward(a["completions"])) / 6
    assert a["accuracy"] == sum(v or 0 for v in answer_reward(a["completions"], answer=answers)) / 6
    greedy = evaluate(tiny_model, tokenizer, ROWS, CONFIG, greedy=True)
    assert greedy["samples"] == 3 and greedy["settings"]["greedy"]


def test_evaluate_restores_the_gpu_generators_too(tiny_model, tokenizer, monkeypatch):
    """torch.manual_seed(seed) reseeds every CUDA device as well; evaluate must give each GPU generator
    back its state, or training samples after an evaluation would depend on the evaluation's seed. The GPU
    is faked: its generator state is a list that seeding overwrites."""
    fake = {"state": [torch.tensor([7, 7, 7], dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in fake["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: fake.__setitem__("state", list(states)))
    real_seed = torch.manual_seed

    def seed_all_devices(seed):
        fake["state"] = [torch.tensor([seed % 256] * 3, dtype=torch.uint8)]
        return real_seed(seed)

    monkeypatch.setattr(torch, "manual_seed", seed_all_devices)
    evaluate(tiny_model, tokenizer, ROWS[:1], CONFIG, num_samples=2, seed=3)
    assert fake["state"][0].tolist() == [7, 7, 7]


def test_evaluate_samples_with_the_config_settings(tiny_model, tokenizer, monkeypatch):
    import grpo_lib.eval as ev

    seen = []
    original = ev.sample_groups

    def spy(model, tok, prompts, G, T, temperature, top_p):
        seen.append((G, T, temperature, top_p))
        return original(model, tok, prompts, G, T, temperature, top_p)

    monkeypatch.setattr(ev, "sample_groups", spy)
    result = evaluate(tiny_model, tokenizer, ROWS, CONFIG.replace(temperature=0.7, top_p=0.9, max_completion_length=4))
    assert seen == [(2, 4, 0.7, 0.9)]
    assert result["settings"]["temperature"] == 0.7 and result["settings"]["top_p"] == 0.9
    evaluate(tiny_model, tokenizer, ROWS, CONFIG, temperature=1.3)  # an explicit argument wins
    assert seen[-1] == (2, 5, 1.3, 1.0)


def test_comparison_table():
    before = {"n": 64, "samples": 128, "format": 0.5, "accuracy": 0.25, "reward/mean": 0.75}
    after = {"n": 64, "samples": 128, "format": 0.75, "accuracy": 0.5, "reward/mean": 1.25}
    table = comparison_table(before, after)
    assert "correct answer" in table and "+0.250" in table and "+0.500" in table
    assert "sentence agrees" not in table and "shortcut" not in table  # an older evaluation has neither
    before.update(consistency=0.5, shortcut={"name": "always the first number", "accuracy": 0.53125})
    after.update(consistency=1.0, shortcut={"name": "always the first number", "accuracy": 0.53125})
    lines = comparison_table(before, after).splitlines()
    assert lines[4].split() == ["sentence", "agrees", "with", "the", "tag", "0.500", "1.000", "+0.500"]
    assert lines[5].split() == ["shortcut:", "always", "the", "first", "number", "0.531", "0.531"]


def test_shortcut_accuracy_and_consistency_in_evaluate(tiny_model, tokenizer):
    from grpo_lib.data import shortcut_accuracy, synthetic_rows

    rows = [{"prompt": r["prompt"], "answer": str(max(a, b)), "question": f"Which is larger, {a} or {b}?"}
            for r, (a, b) in zip(ROWS, ((12, 40), (77, 31), (50, 51)))]
    # the first number is the larger in one of the three questions (77 > 31)
    assert shortcut_accuracy("larger", rows) == ("always the first number", 1 / 3)
    assert shortcut_accuracy("gsm8k", rows) is None
    held_out = synthetic_rows("larger", 200, split="test")
    first_larger = sum(int(r["question"].split()[3]) > int(r["question"].split()[5].rstrip("?")) for r in held_out)
    assert shortcut_accuracy("larger", held_out)[1] == first_larger / 200
    result = evaluate(tiny_model, tokenizer, rows, CONFIG.replace(task="larger"), num_samples=2)
    assert result["shortcut"] == {"name": "always the first number", "accuracy": 1 / 3}
    # a random tiny model states no "X is larger than Y": nothing to agree or disagree with
    assert result["consistency"] != result["consistency"]


@pytest.mark.parametrize("seed", [0, 11])
def test_forked_rng_restores_python_numpy_torch(seed):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with rng.forked_rng(seed):
        random.random(), np.random.rand(), torch.rand(1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_evaluate_calls_reward_functions_as_trl_does(tiny_model, tokenizer):
    """A function written for TRL (chat-message completions, completion_ids) scores the evaluation's mean reward."""
    trl_rewards = pytest.importorskip("trl.rewards")
    chat_rows = [{"prompt": [{"role": "user", "content": f"Which is larger, {a} or {b}?"}], "answer": str(max(a, b))}
                 for a, b in ((12, 40), (77, 31))]
    overlong = trl_rewards.get_soft_overlong_punishment(max_completion_len=5, soft_punish_cache=2)
    result = evaluate(tiny_model, tokenizer, chat_rows, CONFIG, num_samples=2,
                      reward_funcs=[trl_rewards.think_format_reward, overlong])
    # DAPO eq. 13 by hand on each completion's token count (EOS included), plus think_format (0 for these)
    from grpo_lib.sampling import sample_groups  # the same draws: evaluate samples from seed 0 in one batch

    with rng.forked_rng(0):
        rollout = sample_groups(tiny_model, tokenizer, [r["prompt"] for r in chat_rows], 2, 5, 1.0, 1.0)
    assert rollout.completion_texts == result["completions"]
    lengths = rollout.lengths.tolist()
    expected = [0.0 if n <= 3 else (3 - n) / 2 if n <= 5 else -1.0 for n in lengths]
    think = [1.0 if t.startswith("<think>") and "</think>" in t else 0.0 for t in result["completions"]]
    assert result["reward/mean"] == pytest.approx(sum(e + t for e, t in zip(expected, think)) / len(expected))


def test_interpret_says_whether_the_shortcut_explains_the_result():
    from grpo_lib.eval import interpret

    shortcut = {"name": "always the first number", "accuracy": 0.53125}
    before = {"accuracy": 0.25, "consistency": 0.5, "shortcut": shortcut}
    near = interpret(before, {"accuracy": 0.5625, "consistency": 0.25, "shortcut": shortcut}, steps=8)
    assert near.startswith("After 8 steps, held-out correctness went from 0.250 to 0.562.")
    assert "within 0.1 of the shortcut *always the first number* (0.531 on these prompts)" in near
    assert near.endswith("25% make a true claim that matches their tag (before training: 50%).")
    far = interpret(before, {"accuracy": 0.96875, "consistency": 1.0, "shortcut": shortcut}, steps=30)
    assert "0.438 above the shortcut" in far and "found the shortcut" not in far  # 0.96875 - 0.53125
    assert interpret({"accuracy": 0.0}, {"accuracy": 0.5}, steps=2) == (
        "After 2 steps, held-out correctness went from 0.000 to 0.500.")  # no shortcut, no claims: nothing more


def test_describe_groups_counts_flat_groups_by_hand():
    from grpo_lib.eval import describe_groups
    from grpo_lib.runlog import StepRecord

    # 3 groups of G=2: [1, 1] all right (copies of one text), [0, 0] all wrong, [1, 0] a spread
    rec = StepRecord(step=8, prompts=["a", "b", "c"], completions=["x", "x", "y", "z", "u", "v"],
                     reward_names=["format", "answer"], rewards=[[1, 1], [1, 1], [1, 0], [1, 0], [1, 1], [1, 0]],
                     reward_weights=[1.0, 1.0], total=[2, 2, 1, 1, 2, 1], advantages=[0, 0, 0, 0, 0.7, -0.7],
                     truncated=[False] * 6, lengths=[1] * 6, num_generations=2)
    assert describe_groups(rec) == (
        "At step 8, 2 of 3 groups have no reward spread (all 2 completions scored the same), so they contribute no "
        "gradient. Of those, 1 are all right and 1 all wrong. 1 are 2 copies of one completion: sampling has become "
        "deterministic there. The other 1 carry the whole update.")
