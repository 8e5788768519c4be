"""Writes tests/browser/run/log.jsonl, the small run log that inspect_widgets.ipynb loads.

Regenerate after a change to StepRecord:  python tests/browser/make_fixture.py
Step 2 is built so that setting the "format" weight to 0 turns group 1 flat: the zero-variance count
shown by the reward playground goes from 1 / 3 to 2 / 3 (the browser test checks this).
"""

import random
import re
from pathlib import Path

import torch

from grpo_lib.advantages import group_advantages
from grpo_lib.rewards import score_completions
from grpo_lib.runlog import StepRecord, append_record

G = 4
PROMPTS = ["What is 3 + 4?", "What is 5 + 7?", "What is 1 + 2?"]
ANSWERS = ["7", "12", "3"]
COMPLETIONS = {
    1: ["<think>3+4=7</think>\n<answer>7</answer>", "7", "The answer is 7.", "<answer>8</answer>",
        "<think>5+7</think> <answer>12</answer>", "12", "<answer>13</answer>", "twelve",
        "<answer>3</answer>", "3", "<think>1+2=3</think><answer>3</answer>", "<answer>3"],
    2: ["<think>3+4=7</think>\n<answer>7</answer>", "<answer>7</answer>", "<answer>8</answer>", "<answer>6</answer>",
        "<answer>13</answer>", "The answer is 13", "<think>5+7=13</think><answer>13</answer>", "13",
        "<answer>3</answer>", "<answer>3</answer>", "<answer>3</answer>", "<answer>3</answer>"],
}


def tokenize(text: str) -> list[str]:
    return re.findall(r"<[^>]+>|\w+|[^\w\s]|\s+", text)


def make_record(step: int, rng: random.Random) -> StepRecord:
    completions = COMPLETIONS[step]
    prompts = [p for p in PROMPTS for _ in range(G)]
    answers = [a for a in ANSWERS for _ in range(G)]
    scores = score_completions(["format", "answer"], prompts, completions, columns={"answer": answers})
    advantages, zero_std = group_advantages(scores.total.view(-1, G))
    tokens = [tokenize(c) for c in completions]
    stats = {
        "logp": [[round(-rng.expovariate(1.5), 4) for _ in t] for t in tokens],
        "ratio": [[round(1 + rng.gauss(0, 0.08), 4) for _ in t] for t in tokens],
        "kl": [[round(abs(rng.gauss(0, 0.02)), 5) for _ in t] for t in tokens],
    }
    totals = scores.total  # [N]
    return StepRecord(
        step=step, prompts=PROMPTS, completions=completions, reward_names=scores.names,
        rewards=scores.as_lists(), reward_weights=scores.weights.tolist(), total=totals.tolist(),
        advantages=advantages.flatten().tolist(),
        truncated=[not c.rstrip().endswith(">") and len(c) > 10 for c in completions],  # plausible flags
        lengths=[len(t) for t in tokens], num_generations=G, answers=ANSWERS, tokens=tokens, token_stats=stats,
        metrics={"reward/mean": totals.mean().item(), "reward/std": totals.std().item(),
                 "adv/zero_std_frac": zero_std.float().mean().item(), "kl/mean": 0.01 * step, "lr": 1e-5},
    )


if __name__ == "__main__":
    run_dir = Path(__file__).parent / "run"
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    rng = random.Random(0)
    for step in COMPLETIONS:
        append_record(run_dir, make_record(step, rng))
