"""The floor of a GRPO step's phases: their matrix-multiply FLOPs over this machine's matmul throughput at the
step's own shapes, measured in the same process. Used by step_vs_trl.py; `python bench/floors.py` prints the
throughputs alone.

FLOPs (a multiply-add counts 2) from the model's config and the step's token counts:

    L = FLOPs of one position through the decoder's linear layers = 2 * linear params
    A = attention FLOPs of one position over c positions of context = 4 * c * q_dim per layer
    O = output head of one position = 2 * vocab * hidden
    LoRA: 2 * r * (in + out) per adapted linear per position in the forward; its weight gradients twice that

    generation  prefill: each group's prompt once (L + A), its last position through O
                decode: every generated token once (L + A + O), the adapters merged into the weights
    training    reference (beta > 0): every position forward (L + A), completion positions through O
                policy: forward (L + A + LoRA) and backward (inputs' gradients, L + A, and the adapters'
                weight gradients), the output head forward, recomputed in backward, and its backward
                (3 O per completion position); positions = per group, the prompt once and G completions
                padded to their longest (what grpo_lib computes)

Throughput: the decoder layer's seven matmuls (and the head's) timed at the phase's own row counts: for
generation, each decoding step at the number of rows still writing then (a step of 3 rows runs its matmuls
far slower per FLOP than one of 32) and the prefill at its positions; for training, the positions of one
group's forward.
Embedding lookups, norms, activations and softmax are left out of the FLOPs, so the floor is a lower bound.
"""

from __future__ import annotations

import statistics
import time

import torch


def layer_shapes(spec) -> list[tuple[int, int]]:
    """(in, out) of the seven linears of one decoder layer."""
    return list(spec.linear_shapes().values())


def matmul_gflops(m: int, shapes: list[tuple[int, int]], repeats: int = 5) -> float:
    """GFLOP/s of x [m, in] @ W^T for the given (in, out) shapes, fp32, the median of `repeats` timings."""
    weights = [torch.randn(o, i) for i, o in shapes]
    xs = [torch.randn(max(m, 1), i) for i, _ in shapes]
    flops = sum(2 * max(m, 1) * i * o for i, o in shapes)
    for x, w in zip(xs, weights):  # warm up
        x @ w.T
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x, w in zip(xs, weights):
            x @ w.T
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def _attention(spec, context: float) -> float:
    """QK^T and AV of one position over `context` positions, every layer."""
    return 4 * context * spec.q_dim * spec.num_layers


def _per_position(spec, config) -> tuple[float, float, float]:
    """(L, O, lora): FLOPs of one position through the decoder's linears, the output head, and the adapters."""
    lora = 2 * spec.lora_params(config.lora_r, config.lora_target_modules) if config.lora_r else 0
    return 2 * spec.linear_params, 2 * spec.vocab_size * spec.hidden_size, lora


def generation_work(spec, config, prompt_tokens: list[int], lengths: list[int]) -> list[tuple[int, float]]:
    """[(rows of the matmuls, FLOPs)]: the prefill of each group's prompt (its last position through the
    head), then one entry per decoding step with the rows still writing. The adapters are merged: no LoRA."""
    G = config.num_generations
    L, O, _ = _per_position(spec, config)
    work = [(P, P * (L + _attention(spec, P / 2)) + O) for P in prompt_tokens]  # causal: half the context
    mean_prompt = sum(prompt_tokens) / len(prompt_tokens)
    for t in range(max(lengths)):
        rows = sum(n > t for n in lengths)
        work.append((rows, rows * (L + O + _attention(spec, mean_prompt + t))))
    assert len(lengths) == G * len(prompt_tokens)
    return work


def training_flops(spec, config, prompt_tokens: list[int], lengths: list[int]) -> tuple[float, int]:
    """(FLOPs of the update and the reference pass, positions of a typical group's forward)."""
    G = config.num_generations
    L, O, lora = _per_position(spec, config)
    total, sizes = 0.0, []
    for g, P in enumerate(prompt_tokens):
        width = max(lengths[g * G:(g + 1) * G])
        positions = P + G * width
        forward = positions * (L + _attention(spec, P + width / 2))
        head = G * width * O
        reference = (forward + head) if config.beta else 0.0
        policy = 2 * forward + positions * 3 * lora + 3 * head  # fwd + input grads; LoRA fwd, input, weight grads
        total += reference + policy
        sizes.append(positions)
    return total, round(statistics.mean(sizes))


def floors(spec, config, prompt_tokens: list[int], lengths: list[int]) -> dict[str, float]:
    """{"generation", "training"} floor seconds, with the FLOPs and the throughputs used."""
    shapes = layer_shapes(spec) + [(spec.hidden_size, spec.vocab_size)]
    rates: dict[int, float] = {}

    def rate(rows: int) -> float:
        if rows not in rates:
            rates[rows] = matmul_gflops(rows, shapes)
        return rates[rows]

    work = generation_work(spec, config, prompt_tokens, lengths)
    generation_s = sum(flops / rate(rows) / 1e9 for rows, flops in work)
    generation = sum(flops for _, flops in work)
    training, positions = training_flops(spec, config, prompt_tokens, lengths)
    training_s = training / rate(positions) / 1e9
    return {"generation_floor_s": generation_s, "training_floor_s": training_s,
            "generation_gflop": generation / 1e9, "training_gflop": training / 1e9,
            "generation_gflops_per_s": generation / generation_s / 1e9,
            "training_gflops_per_s": training / training_s / 1e9}


if __name__ == "__main__":
    from grpo_lib.model_specs import MODEL_SPECS

    spec = MODEL_SPECS["SmolLM2-135M-Instruct"]
    for m in (1, 8, 32, 256, 1024):
        print(f"rows {m:5d}: {matmul_gflops(m, layer_shapes(spec) + [(spec.hidden_size, spec.vocab_size)]):6.1f} GFLOP/s")
