"""Sampling a group of G completions per prompt, with the masks GRPO needs.

The completion mask covers each completion up to and including its first EOS; a completion that
reaches max_completion_length without EOS is flagged truncated (it is still scored and trained on).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .data import format_prompt
from .models import model_device


@dataclass
class Rollout:
    """G completions for each of `groups` prompts; completion i belongs to group i // G (group-major)."""

    prompts: list[str]  # [groups] formatted prompt texts
    prompt_ids: torch.Tensor  # [groups, P] left-padded prompt tokens (one row per group, not per completion)
    prompt_mask: torch.Tensor  # [groups, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded sampled tokens
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    completion_texts: list[str]  # [N] decoded, special tokens skipped
    truncated: torch.Tensor  # [N] bool: hit max_completion_length without EOS
    num_generations: int

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def group_index(self) -> torch.Tensor:
        """[N] the group of each completion."""
        return torch.arange(self.num_groups).repeat_interleave(self.num_generations)

    @property
    def lengths(self) -> torch.Tensor:
        """[N] completion tokens counted by the mask (EOS included)."""
        return self.completion_mask.sum(dim=1)

    def expanded_prompts(self) -> list[str]:
        """[N] the prompt of each completion (reward functions take prompts per completion)."""
        return [p for p in self.prompts for _ in range(self.num_generations)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (may be a list)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] = 1 up to and including the first EOS; truncated [N] = no EOS at all."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.size(1))  # [N]
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)[None, :]
    mask = (positions <= first_eos[:, None]).long()
    return mask, ~has_eos


def tokenize_prompts(tokenizer, prompt_texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask [groups, P]. The chat template already holds the special tokens."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@contextlib.contextmanager
def eval_mode(model):
    """No dropout while sampling; the previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int):
    """KV cache of each prompt but its last token, computed once per group and repeated G times.

    prompt_ids, prompt_mask: [groups, P]. generate() then starts from the last prompt token, so the
    prompt's prefill costs `groups` rows instead of groups * G: the same tokens, ~G times less prefill.
    """
    out = model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                position_ids=(prompt_mask[:, :-1].cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)  # [groups, ...] -> [groups * G, ...], group-major
    return cache


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         max_completion_length: int, **sampling):
    """model.generate on left-padded prompts [B, P] -> (completion_ids [B, T], mask [B, T], truncated [B],
    texts [B]); ids after the first EOS are replaced by padding. `sampling` goes to generate()."""
    eos_ids = eos_token_ids(model, tokenizer)
    with eval_mode(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_completion_length,
                             eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, **sampling)
    completion_ids = out[:, prompt_ids.size(1):]  # [B, T]
    mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return completion_ids, mask, truncated, tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def sample_groups(model, tokenizer, prompts: list, num_generations: int, max_completion_length: int,
                  temperature: float = 1.0, top_p: float = 1.0) -> Rollout:
    """Sample `num_generations` completions for each prompt (torch's global RNG drives the sampling).

    prompts: [groups] chat message lists or already formatted strings.
    Returns a Rollout with completion tensors [N = groups * G, T <= max_completion_length].
    """
    texts = [format_prompt(tokenizer, p) for p in prompts]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, texts, model_device(model))  # [groups, P]
    with eval_mode(model):
        cache = shared_prompt_cache(model, prompt_ids, prompt_mask, num_generations)
    completion_ids, mask, truncated, completion_texts = generate_completions(
        model, tokenizer, prompt_ids.repeat_interleave(num_generations, dim=0),  # [N, P]
        prompt_mask.repeat_interleave(num_generations, dim=0), max_completion_length, past_key_values=cache,
        do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
    return Rollout(texts, prompt_ids, prompt_mask, completion_ids, mask, completion_texts, truncated,
                   num_generations)
