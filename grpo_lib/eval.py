"""Evaluation on held-out prompts: format compliance, correctness and mean reward, reported separately.

By default each prompt gets `num_samples` completions sampled with the config's sampling settings
(temperature, top_p, max_completion_length: the policy GRPO actually trains, measured with less noise
than one sample) from a fixed seed; greedy=True decodes greedily instead. Every random stream is
restored afterwards (rng.forked_rng), so evaluating never changes what a run samples next.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import verify
from .advantages import group_advantages
from .config import GRPOConfig
from .data import format_prompt, shortcut_accuracy
from .logprobs import rollout_logps
from .models import model_device, model_mode
from .rewards import (answer_reward, consistency_reward, format_reward, resolve_reward_funcs, reward_inputs,
                      score_completions)
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


def is_code_task(columns: dict) -> bool:
    """Whether rows are scored by running code against their tests (no gold `answer`, and one of
    verify.CODE_TEST_COLUMNS) rather than by a tagged answer."""
    return "answer" not in columns and any(c in columns for c in verify.CODE_TEST_COLUMNS)


def correctness(inputs: dict) -> list[float]:
    """[N] how right each completion is: 1/0 against the gold `answer`, or on a code task the share of its row's
    tests passed (verify.code_tests_reward: the pass rate); 0 where nothing applies. inputs: reward_inputs()."""
    completions, columns = inputs["completions"], inputs["columns"]
    if is_code_task(columns):
        values = verify.code_tests_reward(completions, prompts=inputs["prompts"], **columns)
    else:
        values = answer_reward(completions, answer=columns.get("answer"))
    return [v or 0.0 for v in values]


def evaluate(model, tokenizer, rows: list[dict], config: GRPOConfig | None = None, *, num_samples: int = 2,
             greedy: bool = False, temperature: float | None = None, top_p: float | None = None,
             max_completion_length: int | None = None, seed: int = 0, batch_size: int = 32,
             reward_funcs=None, reward_weights=None) -> dict:
    """Score completions of `rows` (each with "prompt" and "answer").

    Sampling settings come from `config` (default GRPOConfig()): temperature, top_p,
    max_completion_length, and the reward functions and weights of "reward/mean"; the keyword arguments
    override them. greedy=True: one greedy completion per prompt.
    Returns {"format": share with one well-formed <answer>NUMBER</answer> (on a code task: with a closed ```python
    block that parses), "accuracy": share correct (on a code task: tests passed / total; see correctness),
    "reward/mean": mean total of the reward functions over the scorable completions, "consistency": share of
    the completions that state "X is larger than Y" whose claims are true and agree with their tag (NaN when
    none does; rewards.consistency_reward), "shortcut": {"name", "accuracy"} of the task's known trick on
    these rows (data.SHORTCUTS, e.g. "always the first number"; None without one), "n": prompts,
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
    code = is_code_task(inputs["columns"])
    fmt = (verify.code_syntax_reward if code else format_reward)(inputs["completions"])
    correct = correctness(inputs)
    total = score_completions(funcs, **inputs, weights=weights).total
    scorable = total[~total.isnan()]
    consistent = [v for v in consistency_reward(inputs["completions"]) if v is not None]
    shortcut = shortcut_accuracy(config.task, rows)
    return {"format": sum(fmt) / len(fmt), "accuracy": sum(correct) / len(correct),
            "reward/mean": scorable.mean().item() if scorable.numel() else float("nan"),
            "consistency": sum(consistent) / len(consistent) if consistent else float("nan"),
            "shortcut": None if shortcut is None else {"name": shortcut[0], "accuracy": shortcut[1]},
            "n": len(rows), "samples": len(texts), "completions": texts, "task_kind": "code" if code else "answer",
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


def policy_logprob_gap(model_a, model_b, tokenizer, prompts: list, config: GRPOConfig | None = None, *,
                       max_completion_length: int = 64, seed: int = 0) -> float:
    """max_t |log pi_a(o_t | q, o_<t) - log pi_b(o_t | q, o_<t)| over every token of one completion per prompt,
    sampled from model_a with the config's temperature and top_p from a fixed seed (every random stream
    restored afterwards). 0 for the same policy, up to kernel rounding: unlike comparing greedy decodes, it
    needs no bit-identical kernels (one rounding difference flips an argmax, and two decodes part for good).
    Both models on the same device; e.g. a trained model and models.load_trained(run_dir / "adapter")."""
    config = config or GRPOConfig()
    with forked_rng(seed):
        rollout = sample_groups(model_a, tokenizer, prompts, 1, max_completion_length, config.temperature,
                                config.top_p)
    idx = torch.arange(rollout.completion_ids.size(0))
    logp = dict(temperature=config.temperature, chunk_size=config.logprob_chunk_size, share_prompt=False)
    with torch.no_grad(), model_mode(model_a, training=False), model_mode(model_b, training=False):
        a = rollout_logps(model_a, rollout, idx, **logp)  # [N, T]
        b = rollout_logps(model_b, rollout, idx, **logp)  # [N, T]
    real = rollout.completion_mask.bool()
    return (a.float() - b.float())[real].abs().max().item()


def comparison_table(before: dict, after: dict) -> str:
    """Before/after side by side, one measure a line; then, where the evaluation has them, whether the
    sentences agree with the tagged answers, and the score of the task's shortcut on the same prompts (the
    same before and after: a property of the prompts, not of the model)."""
    head = f"held-out prompts: {before['n']} ({before.get('samples', before['n'])} completions)"
    lines = [f"{head:<42}{'before':>8}{'after':>8}{'change':>9}"]
    correct = "tests passed (pass rate)" if before.get("task_kind") == "code" else "correct answer"
    rows = [("format", "format compliance"), ("accuracy", correct), ("reward/mean", "mean reward")]
    if all(isinstance(d.get("consistency"), float) and not math.isnan(d["consistency"]) for d in (before, after)):
        rows.append(("consistency", "sentence agrees with the tag"))  # NaN: no completion made a claim
    for key, label in rows:
        lines.append(f"{label:<42}{before[key]:>8.3f}{after[key]:>8.3f}{after[key] - before[key]:>+9.3f}")
    if after.get("shortcut"):
        label = f"shortcut: {after['shortcut']['name']}"
        lines.append(f"{label:<42}{after['shortcut']['accuracy']:>8.3f}{after['shortcut']['accuracy']:>8.3f}"
                     f"{'':>9}")
    return "\n".join(lines)


SHORTCUT_MARGIN = 0.1
"""Held-out correctness within this of the task's shortcut's score is read as the shortcut, not the task."""


def interpret(before: dict, after: dict, steps: int) -> str:
    """What a before/after evaluation says, in sentences built from its numbers (notebook 05 shows them as
    Markdown, so the prose cannot go stale): the change in correctness, whether the task's shortcut explains it
    (within SHORTCUT_MARGIN of the shortcut's score on the same prompts), and whether sentences agree with tags."""
    text = [f"After {steps} steps, held-out correctness went from {before['accuracy']:.3f} to {after['accuracy']:.3f}."]
    shortcut = after.get("shortcut")
    if shortcut:
        name, score = shortcut["name"], shortcut["accuracy"]
        if after["accuracy"] <= score + SHORTCUT_MARGIN:
            text.append(f"That is within {SHORTCUT_MARGIN} of the shortcut *{name}* ({score:.3f} on these prompts): "
                        f"so far the policy has found the shortcut, not the task. A run that stopped here would "
                        f"have learned a trick; the README's main job (the same preset, 30 steps) goes on past it.")
        else:
            text.append(f"That is {after['accuracy'] - score:.3f} above the shortcut *{name}* ({score:.3f} on these "
                        f"prompts): more than the trick explains.")
    cb, ca = before.get("consistency"), after.get("consistency")
    if all(isinstance(c, float) and not math.isnan(c) for c in (cb, ca)):
        text.append(f"Among completions that state \"X is larger than Y\", {ca:.0%} make a true claim that matches "
                    f"their tag (before training: {cb:.0%}).")
    return " ".join(text)


def describe_groups(record) -> str:
    """One step's groups in words: how many have no reward spread (no gradient), and of those how many are all
    right, all wrong (by the `answer` reward, when the run has one) and G copies of one completion."""
    G, n = record.num_generations, record.num_groups
    totals = torch.tensor([math.nan if t is None else t for t in record.total]).view(n, G)  # [groups, G]
    flat = [g for g in range(n) if bool(group_advantages(totals[g:g + 1])[1][0])]
    text = [f"At step {record.step}, {len(flat)} of {n} groups have no reward spread (all {G} completions scored "
            f"the same), so they contribute no gradient."]
    if flat and "answer" in record.reward_names:
        f = record.reward_names.index("answer")
        answers = [[record.rewards[g * G + j][f] for j in range(G)] for g in flat]
        right = sum(all(a == 1.0 for a in group) for group in answers)
        wrong = sum(all(not a for a in group) for group in answers)
        text.append(f"Of those, {right} are all right and {wrong} all wrong.")
    copies = sum(len(set(record.completions[g * G:(g + 1) * G])) == 1 for g in flat)
    if copies:
        text.append(f"{copies} are {G} copies of one completion: sampling has become deterministic there.")
    text.append("The step taught nothing." if len(flat) == n else f"The other {n - len(flat)} carry the whole update.")
    return " ".join(text)
