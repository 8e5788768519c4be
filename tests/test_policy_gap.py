"""eval.policy_logprob_gap: the reload self-check compares log-probabilities within a tolerance, not greedy
decodes (which need bit-identical kernels). Checked against log-probs from a plain full forward."""

import copy

import torch

from grpo_lib.eval import policy_logprob_gap
from grpo_lib.config import GRPOConfig
from grpo_lib.rng import forked_rng
from grpo_lib.sampling import sample_groups

PROMPTS = ["<|im_start|>user\nSay yes<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nCount to three<|im_end|>\n<|im_start|>assistant\n"]
CONFIG = GRPOConfig(model="tiny", load_in_4bit=False, temperature=0.7, top_p=1.0)


def full_forward_logps(model, rollout) -> torch.Tensor:
    """[N, T] log softmax(z / tau)[o_t] from one forward over prompt + completion per row (no cache, no chunks)."""
    P = rollout.prompt_ids.size(1)
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # G = 1: one row per prompt
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logps = (logits[:, P - 1:-1].float() / CONFIG.temperature).log_softmax(-1)
    return logps.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def test_the_same_policy_reloaded_has_no_gap_and_the_rng_is_untouched(tiny_peft_model, tokenizer):
    reloaded = copy.deepcopy(tiny_peft_model)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    assert policy_logprob_gap(tiny_peft_model, reloaded, tokenizer, PROMPTS, CONFIG, max_completion_length=12) == 0.0
    assert torch.equal(torch.rand(3), expected_next)  # sampling inside did not move the caller's stream


def test_a_changed_adapter_shows_as_the_largest_log_prob_difference(tiny_peft_model, tokenizer):
    other = copy.deepcopy(tiny_peft_model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.mul_(1.5)
    gap = policy_logprob_gap(tiny_peft_model, other, tokenizer, PROMPTS, CONFIG, max_completion_length=12, seed=3)
    with forked_rng(3):  # the completions the function sampled: model A's, same seed and settings
        rollout = sample_groups(tiny_peft_model, tokenizer, PROMPTS, 1, 12, CONFIG.temperature, CONFIG.top_p)
    assert rollout.completion_mask.all()  # a random model writes no EOS: every position is a real token
    expected = (full_forward_logps(tiny_peft_model, rollout) - full_forward_logps(other, rollout)).abs().max().item()
    assert expected > 1e-3 and abs(gap - expected) < 1e-4
