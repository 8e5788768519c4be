"""Evaluation on held-out prompts: format compliance, correctness and mean reward, reported separately.

By default each prompt gets `num_samples` completions sampled with the config's sampling settings
(temperature, top_p, max_completion_length: the policy GRPO actually trains, measured with less noise
than one sample) from a fixed seed; greedy=True decodes greedily instead. Every random stream is
restored afterwards (rng.forked_rng), so evaluating never changes what a run samples next.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import GRPOConfig
from .data import format_prompt
from .models import model_device
from .rewards import answer_reward, format_reward, resolve_reward_funcs, reward_inputs, score_completions
from .rng import forked_rng
from .sampling import generate_completions, sample_groups, tokenize_prompts


def _completions(model, tokenizer, prompts: list, max_completion_length: int, num_samples: int,
                 temperature: float | None, top_p: float) -> tuple[list[str], list[list[int]]]:
    """([len(prompts) * num_samples] texts, their token ids), prompt-major; temperature None = greedy."""
    if temperature is None:
        texts = [format_prompt(tokenizer, p) for p in prompts]
        ids, mask = tokenize_prompts(tokenizer, texts, model_device(model))
        out_ids, out_mask, _, out_texts = generate_completions(model, tokenizer, ids, mask, max_completion_length,
                                                               do_sample=False, temperature=None, top_p=None,
                                                               top_k=None)
        return out_texts, [row[:n] for row, n in zip(out_ids.tolist(), out_mask.sum(1).tolist())]
    rollout = sample_groups(model, tokenizer, prompts, num_samples, max_completion_length, temperature, top_p)
    return rollout.completion_texts, rollout.completion_id_lists()


def evaluate(model, tokenizer, rows: list[dict], config: GRPOConfig | None = None, *, num_samples: int = 2,
             greedy: bool = False, temperature: float | None = None, top_p: float | None = None,
             max_completion_length: int | None = None, seed: int = 0, batch_size: int = 32,
             reward_funcs=None, reward_weights=None) -> dict:
    """Score completions of `rows` (each with "prompt" and "answer").

    Sampling settings come from `config` (default GRPOConfig()): temperature, top_p,
    max_completion_length, and the reward functions and weights of "reward/mean"; the keyword arguments
    override them. greedy=True: one greedy completion per prompt.
    Returns {"format": share with one well-formed <answer>NUMBER</answer>, "accuracy": share correct,
    "reward/mean": mean total of the reward functions over the scorable completions, "n": prompts,
    "samples": completions scored, "completions": their texts, "settings": what was used}.
    """
    config = config or GRPOConfig()
    temperature = None if greedy else (temperature or config.temperature)
    top_p = config.top_p if top_p is None else top_p
    max_completion_length = max_completion_length or config.max_completion_length
    funcs = resolve_reward_funcs(reward_funcs or config.reward_funcs)
    weights = reward_weights if reward_weights is not None else (None if reward_funcs else config.reward_weights)
    num_samples = 1 if greedy else num_samples
    per_batch = max(1, batch_size // num_samples)
    texts, ids = [], []
    with forked_rng(seed):
        for start in range(0, len(rows), per_batch):
            batch = [r["prompt"] for r in rows[start:start + per_batch]]
            more_texts, more_ids = _completions(model, tokenizer, batch, max_completion_length, num_samples,
                                                temperature, top_p)
            texts, ids = texts + more_texts, ids + more_ids
    inputs = reward_inputs(rows, texts, num_samples, ids)
    fmt = format_reward(inputs["completions"])
    correct = [v or 0.0 for v in answer_reward(inputs["completions"], answer=inputs["columns"].get("answer"))]
    total = score_completions(funcs, **inputs, weights=weights).total
    scorable = total[~total.isnan()]
    return {"format": sum(fmt) / len(fmt), "accuracy": sum(correct) / len(correct),
            "reward/mean": scorable.mean().item() if scorable.numel() else float("nan"),
            "n": len(rows), "samples": len(texts), "completions": texts,
            "settings": {"greedy": greedy, "temperature": temperature, "top_p": top_p, "num_samples": num_samples,
                         "max_completion_length": max_completion_length, "seed": seed}}


def cached_evaluate(path: str | Path, model, tokenizer, rows: list[dict], config: GRPOConfig | None = None,
                    **kwargs) -> dict:
    """evaluate(), computed once per `path` (a JSON file in the run directory): a resumed run compares with
    the evaluation made before its first step, not with one of the half-trained model."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate(model, tokenizer, rows, config, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def comparison_table(before: dict, after: dict) -> str:
    """Before/after side by side, one measure a line."""
    head = f"held-out prompts: {before['n']} ({before.get('samples', before['n'])} completions)"
    lines = [f"{head:<42}{'before':>8}{'after':>8}{'change':>9}"]
    for key, label in (("format", "format compliance"), ("accuracy", "correct answer"), ("reward/mean", "mean reward")):
        lines.append(f"{label:<42}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+9.3f}")
    return "\n".join(lines)
