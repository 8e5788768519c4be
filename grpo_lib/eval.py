"""Evaluation on held-out prompts: format compliance, correctness and mean reward, reported separately.

By default each prompt gets `num_samples` completions sampled at the training temperature from a fixed
seed (the policy GRPO actually trains, measured with less noise than one sample); temperature=None
decodes greedily. The caller's RNG state is left untouched, so evaluating never changes a run.
"""

from __future__ import annotations

import torch

from .data import format_prompt
from .models import model_device
from .rewards import answer_reward, format_reward, resolve_reward_funcs, score_completions
from .sampling import generate_completions, sample_groups, tokenize_prompts


def _completions(model, tokenizer, prompts: list, max_completion_length: int, num_samples: int,
                 temperature: float | None) -> list[str]:
    """[len(prompts) * num_samples] texts, prompt-major."""
    if temperature is None:
        texts = [format_prompt(tokenizer, p) for p in prompts]
        ids, mask = tokenize_prompts(tokenizer, texts, model_device(model))
        return generate_completions(model, tokenizer, ids, mask, max_completion_length, do_sample=False,
                                    temperature=None, top_p=None, top_k=None)[3]
    return sample_groups(model, tokenizer, prompts, num_samples, max_completion_length, temperature).completion_texts


def evaluate(model, tokenizer, rows: list[dict], max_completion_length: int = 256, num_samples: int = 2,
             temperature: float | None = 1.0, seed: int = 0, batch_size: int = 32, reward_funcs=None) -> dict:
    """Score completions of `rows` (each with "prompt" and "answer").

    Returns {"format": share with one well-formed <answer>NUMBER</answer>, "accuracy": share correct,
    "reward/mean": mean total of reward_funcs (default format + answer), "n": prompts,
    "samples": completions scored, "completions": their texts}.
    """
    num_samples = 1 if temperature is None else num_samples
    funcs = resolve_reward_funcs(reward_funcs or [format_reward, answer_reward])
    per_batch = max(1, batch_size // num_samples)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), per_batch):
            batch = [r["prompt"] for r in rows[start:start + per_batch]]
            texts += _completions(model, tokenizer, batch, max_completion_length, num_samples, temperature)
    prompts = [format_prompt(tokenizer, r["prompt"]) for r in rows for _ in range(num_samples)]
    answers = [r.get("answer") for r in rows for _ in range(num_samples)]
    fmt = torch.tensor(format_reward(prompts, texts), dtype=torch.float32)
    correct = torch.tensor([v or 0.0 for v in answer_reward(prompts, texts, answer=answers)])
    total = score_completions(funcs, prompts, texts, {"answer": answers}).total
    return {"format": fmt.mean().item(), "accuracy": correct.mean().item(), "reward/mean": total.mean().item(),
            "n": len(rows), "samples": len(texts), "completions": texts}


def comparison_table(before: dict, after: dict) -> str:
    """Before/after side by side, one measure a line."""
    head = f"held-out prompts: {before['n']} ({before.get('samples', before['n'])} completions)"
    lines = [f"{head:<42}{'before':>8}{'after':>8}{'change':>9}"]
    for key, label in (("format", "format compliance"), ("accuracy", "correct answer"), ("reward/mean", "mean reward")):
        lines.append(f"{label:<42}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+9.3f}")
    return "\n".join(lines)
