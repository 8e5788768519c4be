"""Evaluation on held-out prompts: format compliance, correctness and mean reward, reported separately.

Greedy decoding (one completion per prompt), so two evaluations of the same model agree exactly.
"""

from __future__ import annotations

import torch

from .data import format_prompt
from .models import model_device
from .rewards import answer_reward, format_reward, resolve_reward_funcs, score_completions
from .sampling import generate_completions, tokenize_prompts


def evaluate(model, tokenizer, rows: list[dict], max_completion_length: int = 256, batch_size: int = 32,
             reward_funcs=None) -> dict:
    """Score greedy completions of `rows` (each with "prompt" and "answer").

    Returns {"format": share with a well-formed <answer>, "accuracy": share correct, "reward/mean": mean
    total of reward_funcs (default format + answer), "n": prompts, "completions": texts}.
    """
    funcs = resolve_reward_funcs(reward_funcs or [format_reward, answer_reward])
    texts, prompts, answers = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompt_texts = [format_prompt(tokenizer, r["prompt"]) for r in batch]
        ids, mask = tokenize_prompts(tokenizer, prompt_texts, model_device(model))
        texts += generate_completions(model, tokenizer, ids, mask, max_completion_length, do_sample=False,
                                      temperature=None, top_p=None, top_k=None)[3]
        prompts += prompt_texts
        answers += [r.get("answer") for r in batch]
    fmt = torch.tensor(format_reward(prompts, texts), dtype=torch.float32)
    correct = torch.tensor([v or 0.0 for v in answer_reward(prompts, texts, answer=answers)])
    total = score_completions(funcs, prompts, texts, {"answer": answers}).total
    return {"format": fmt.mean().item(), "accuracy": correct.mean().item(), "reward/mean": total.mean().item(),
            "n": len(rows), "completions": texts}


def comparison_table(before: dict, after: dict) -> str:
    """Before/after side by side, one measure a line."""
    lines = [f"{'held-out prompts: ' + str(before['n']):<28}{'before':>8}{'after':>8}{'change':>9}"]
    for key, label in (("format", "format compliance"), ("accuracy", "correct answer"), ("reward/mean", "mean reward")):
        lines.append(f"{label:<28}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+9.3f}")
    return "\n".join(lines)
