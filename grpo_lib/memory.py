"""The peak-memory estimate: what one GRPO step of a configuration needs, component by component.

    peak = always-resident (weights, LoRA, gradients, AdamW states, CUDA context)
           + the largest of the step's phases:
               generation  KV cache of N = prompts_per_step * G rows of (P + T) tokens + sampling buffers
                           (+ the merged copy of the adapted weights, without 4-bit)
               reference   one no-grad forward of a micro-batch (adapters off)
               training    saved activations of a micro-batch (on the shared-prompt path, of the
                           config.groups_per_backward groups of it - 2 by default - that one backward covers,
                           unless top_entropy_quantile < 1 keeps the micro-batch in one) + the larger of:
                           the logits chunk of the head's backward (first), one layer's backward

The planner in three modules, each importing only the one before it: grpo_lib.model_specs (the
architectures), this module (the estimate: `estimate` -> MemoryReport) and grpo_lib.memory_advice (the
table, the verdict, cheaper settings, plan_or_refuse).

Nothing here allocates: sizes come from the architecture (model_specs.model_spec: a built-in table of
common models, a transformers config, or a loaded model) and the config. The per-token activation counts were read
off autograd's saved tensors (torch.autograd.graph.saved_tensors_hooks) for the code paths of
grpo_lib.logprobs, and the whole estimate is checked against the measured resident-memory increase
of real training steps on CPU (tests/test_memory.py, bench/memory_check.py).

A fact worth knowing about QLoRA: peft's prepare_model_for_kbit_training casts every parameter that
is not 4-bit (embeddings, untied lm_head, norms, biases) to fp32, so the embedding output - and with
it the whole residual stream, every saved activation and the logits - is fp32 even with fp16/bf16
compute; bitsandbytes' 4-bit matmuls cast their output back to the input's dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .model_specs import ModelSpec, lora_targets, model_spec

GiB = 2**30
MiB = 2**20
# the default without a GPU: a Colab T4's "16 GB" as torch reports it there, 14.56-14.75 GiB; plan for the least
T4_REPORTED_BYTES = int(14.56 * GiB)
CUDA_CONTEXT_BYTES = 512 * MiB  # CUDA context + cuBLAS workspace + loaded kernels, typical for a T4 under torch
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + 8-bit absmax per 64 + fp32 per 256 blocks
LOGITS_BLOCKS_TRAIN = 4  # [chunk, V] fp32 blocks alive in a chunk's backward (recomputed logits, grads)
# Not counted, negligible: the per-token entropies the update's forward returns ([N, T] fp32, e.g. 32 x 256 x 4 =
# 32 KiB) and the softmax block their computation adds to a chunk's forward (logits + softmax: 2 [chunk, V]
# blocks, below the backward's 4; checkpointing's recompute stops before it, so backward has none).
LOGITS_BLOCKS_NO_GRAD = 2  # logits and logits / temperature (measured: 2.1 blocks)
SAMPLING_BLOCKS = 4  # [N, V] fp32 blocks per decoding step: logits, copy, processed scores, probabilities

# Typical formatted prompt length (tokens, chat template included, one-shot) per task: the 95th
# percentile for GSM8K (median 155, max 293), the fixed length of the synthetic tasks. Measured with
# the SmolLM2 tokenizer; Qwen's and Llama's tokenizers give similar counts on English text.
TYPICAL_PROMPT_TOKENS = {"gsm8k": 200, "larger": 81, "successor": 78, "addition": 79}


# what each component is, and when it is alive ("always" or the phase that holds it)
COMPONENTS = {
    "weights": ("always", "frozen base weights (nf4 linear layers; embeddings/norms fp32 after kbit prep)"),
    "lora_params": ("always", "trainable parameters (LoRA adapters, fp32)"),
    "gradients": ("always", "one gradient per trainable parameter (kept between steps)"),
    "optimizer_states": ("always", "AdamW exp_avg + exp_avg_sq"),
    "cuda_context": ("always", "CUDA context, cuBLAS workspace, kernels"),
    "kv_cache": ("generation", "keys/values of N rows x (prompt + completion) tokens x layers"),
    "sampling_buffers": ("generation", "per-token [N, vocab] fp32 logits and probabilities (logits of the steps "
                                       "between two host synchronisations on a GPU)"),
    "merged_weights": ("generation", "LoRA merged into a copy of the adapted base weights while sampling"),
    "reference_pass": ("reference", "no-grad forward of a micro-batch: one layer's temporaries, cache, logits"),
    "activations": ("training", "tensors autograd saves for backward: a micro-batch, or on the shared path the "
                                "groups_per_backward groups of it one backward covers"),
    "logits": ("training", "[chunk, vocab] fp32 blocks of the chunked output head in backward (+ its fp16 weight copy)"),
    "layer_backward": ("training", "one layer's backward: its recomputed activations (checkpointing), gradients"),
}


@dataclass
class MemoryReport:
    """Predicted peak memory of one training step. `components` maps a name (see COMPONENTS) to
    bytes; the peak is the always-resident components plus the largest phase, not their sum. The
    training phase is activations + the larger of logits and layer_backward (not alive at once)."""

    model: str
    device: str
    device_bytes: int
    components: dict[str, int]
    phases: dict[str, int]  # "generation", "reference", "training" -> bytes on top of the resident ones
    activations_checkpointing: int  # activations + layer backward with gradient checkpointing ...
    activations_no_checkpointing: int  # ... and without, whatever the config says
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def persistent_bytes(self) -> int:
        return sum(b for n, b in self.components.items() if COMPONENTS[n][0] == "always")

    @property
    def total_bytes(self) -> int:
        return self.persistent_bytes + max(self.phases.values())

    @property
    def step_bytes(self) -> int:
        """What a step adds to a freshly loaded model: gradients, optimizer states and the largest phase
        (the figure compared with the measured resident-memory increase on CPU)."""
        c = self.components
        return c["gradients"] + c["optimizer_states"] + max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes


def default_device_bytes(device: str = "cuda") -> int:
    """The detected GPU's total memory; without a GPU, what a Colab T4 reports (14.56 GiB). For
    device="cpu": the machine's physical memory."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    return T4_REPORTED_BYTES


def microbatch_shape(config) -> tuple[int, int, int]:
    """(completions, groups touched, largest completions of one group) over the micro-batches of a step:
    the step's N = prompts_per_step * G completions split into gradient_accumulation_steps slices."""
    N, G, k = config.batch_size, config.num_generations, config.gradient_accumulation_steps
    n = N // k
    slices = [range(i * n, (i + 1) * n) for i in range(k)]
    groups = max(len({j // G for j in s}) for s in slices)
    per_group = max(sum(1 for j in s if j // G == g) for s in slices for g in {j // G for j in s})
    return n, groups, per_group


def layer_activation_bytes(spec: ModelSpec, stream_fp32: bool, targets: str, r: int,
                           lora_dropout: float = 0.0) -> float:
    """Bytes autograd saves per token in one decoder layer (keys/values of attention excluded).

    Read off saved_tensors_hooks for grpo_lib's paths (Llama layer, SDPA, peft LoRA without dropout;
    frozen linear layers save nothing, LoRA saves its input and its r-dim hidden), all-linear LoRA:
      fp32 stream (CPU fp32, or QLoRA after kbit prep):  4 * (6H + 4I + nh) + 4 * r per adapter
      bf16/fp16 weights + fp32 LoRA (peft casts the LoRA input to fp32, per adapter):
                                                          36H + 10I + 4 nh + 4 * r per adapter
    With lora_dropout > 0 each adapter also keeps its own dropped input (fp32) and dropout mask.
    """
    H, I, nh = spec.hidden_size, spec.intermediate_size, spec.num_heads
    adapted = lora_targets(targets) if r > 0 else ()
    lora = 4 * r * len(adapted)
    inputs = sum(spec.linear_shapes()[n][0] for n in adapted)  # in_features summed over adapters
    if stream_fp32:
        dropout = 5 * inputs if lora_dropout > 0 else 0
        return 4 * (5 * H + ("o_proj" in adapted) * H + 3 * I + ("down_proj" in adapted) * I + nh) + lora + dropout
    # bf16 stream: norm inputs kept in fp32 (2 x 4H), q and attention output (2 x 2H), gate/silu/up
    # (3 x 2I), and an fp32 copy of each adapted layer's input (4 x in_features, dropped if dropout)
    return 8 * H + 4 * H + 6 * I + 4 * nh + (5 if lora_dropout > 0 else 4) * inputs + lora


def estimate(config, model_or_spec=None, device_bytes: int | None = None, *, device: str = "cuda",
             prompt_length: int | None = None) -> MemoryReport:
    """Predict the peak memory of one grpo_lib training step of `config` on `model_or_spec`.

    model_or_spec: a name (default config.model), a transformers config, a loaded model or a ModelSpec.
    device: "cuda" (fp16/bf16 compute, the default: planning for a GPU) or "cpu" (fp32, no CUDA context).
    device_bytes: memory to compare with (default: the detected GPU, else a T4's 14.56 GiB; RAM for "cpu").
    prompt_length: formatted prompt tokens (default: a typical length for config.task, at most
    config.max_prompt_length; prompts are left-padded to the longest of a step).
    """
    spec = model_spec(config.model if model_or_spec is None else model_or_spec)
    device_bytes = default_device_bytes(device) if device_bytes is None else int(device_bytes)
    cpu = device == "cpu"
    P = prompt_length or min(config.max_prompt_length,
                             TYPICAL_PROMPT_TOKENS.get(config.task, config.max_prompt_length))
    T, N, r = config.max_completion_length, config.batch_size, config.lora_r
    # bytes of the compute dtype: config.dtype, or "auto": fp32 on CPU, bf16/fp16 on GPUs
    wb = {"float32": 4, "bfloat16": 2, "float16": 2}.get(config.dtype, 4 if cpu else 2)
    four_bit = config.load_in_4bit
    stream_fp32 = cpu or four_bit  # kbit prep makes the residual stream fp32 (module docstring)
    notes = []

    # 1) always resident: weights, trainable parameters, their gradients and AdamW states
    if four_bit:  # kbit prep upcasts every non-4-bit parameter (embeddings, norms, biases) to fp32
        weights = spec.linear_params * NF4_BYTES_PER_PARAM + spec.other_params * 4
    else:
        weights = spec.num_params * wb
    if r > 0:
        trainable, train_b = spec.lora_params(r, config.lora_target_modules), 4  # peft keeps adapters fp32
    else:
        trainable, train_b = spec.num_params, wb
        if config.beta != 0:
            weights += spec.num_params * wb
            notes.append("lora_r=0 with beta>0: the reference model is a second full copy of the weights")
    components = {
        "weights": weights, "lora_params": trainable * train_b if r > 0 else 0,
        "gradients": trainable * train_b, "optimizer_states": 2 * trainable * train_b,
        "cuda_context": 0 if cpu else CUDA_CONTEXT_BYTES,
    }

    # 2) generation: the KV cache of N rows of (P + T) tokens, the sampling buffers of one decoding step
    components["kv_cache"] = N * (P + T) * spec.num_layers * 2 * spec.kv_dim * (4 if stream_fp32 else wb)
    from .sampling import SYNC_EVERY  # decode keeps the logits of the steps between two host synchronisations

    window = 1 if cpu else SYNC_EVERY
    components["sampling_buffers"] = (SAMPLING_BLOCKS + window - 1) * N * spec.vocab_size * 4
    # models.merged_adapters: a merged copy of every adapted weight while sampling (not into 4-bit weights)
    adapted = spec.num_layers * sum(i * o for n, (i, o) in spec.linear_shapes().items()
                                    if n in lora_targets(config.lora_target_modules))
    components["merged_weights"] = adapted * wb if r > 0 and not four_bit else 0

    # 3) reference pass (no grad) and 4) training, one micro-batch each (on the shared-prompt path, a backward
    # every groups_per_backward groups)
    ckpt = config.gradient_checkpointing
    # logprobs.head_dtype: QLoRA's fp32 head multiplies from a copy in the compute dtype, alive while a pass's
    # head runs (forward, and its backward, which comes first)
    head = spec.vocab_size * spec.hidden_size * wb if four_bit and wb < 4 else 0
    components["reference_pass"] = _micro_batch(spec, config, P, stream_fp32, ckpt, grad=False, head=head)[0]
    with_ckpt = _micro_batch(spec, config, P, stream_fp32, True, head=head)
    without = _micro_batch(spec, config, P, stream_fp32, False, head=head)
    components["activations"], components["logits"], components["layer_backward"] = with_ckpt if ckpt else without
    act_ckpt, act_plain = with_ckpt[0] + with_ckpt[2], without[0] + without[2]  # activations, logits aside
    phases = {"generation": components["kv_cache"] + components["sampling_buffers"] + components["merged_weights"],
              "reference": components["reference_pass"],
              "training": _training_phase(with_ckpt if ckpt else without)}

    if four_bit and not cpu:
        notes.append(f"embeddings{'' if spec.tie_word_embeddings else ' and lm_head'} are fp32 after peft's "
                     f"prepare_model_for_kbit_training ({bytes_text(spec.other_params * 4)}), and so are activations")
    if cpu and four_bit:
        notes.append("4-bit on CPU: bitsandbytes' dequantised temporaries are not counted")
    n, groups, _ = microbatch_shape(config)
    return MemoryReport(
        model=spec.name, device=device, device_bytes=device_bytes,
        components={k: int(round(v)) for k, v in components.items()},
        phases={k: int(round(v)) for k, v in phases.items()},
        activations_checkpointing=int(act_ckpt), activations_no_checkpointing=int(act_plain),
        settings={"prompt_tokens": P, "completion_tokens": T, "num_generations": config.num_generations,
                  "completions": N, "micro_batch": n, "groups_per_micro_batch": groups,
                  "gradient_accumulation_steps": config.gradient_accumulation_steps,
                  "gradient_checkpointing": ckpt, "share_prompt_forward": config.uses_shared_prompt_forward,
                  "backward_per_group": config.backward_per_group,
                  "groups_per_backward": config.groups_per_backward,
                  "load_in_4bit": four_bit, "lora_r": r, "trainable_params": trainable,
                  "params": spec.num_params, "logprob_chunk_size": config.logprob_chunk_size},
        notes=notes)


def _training_phase(micro_batch: tuple[float, float, float]) -> float:
    """The training phase of _micro_batch's (activations, logits, layer backward): the head's backward runs
    first and frees its logits before any layer's backward starts."""
    activations, logits, layer_backward = micro_batch
    return activations + max(logits, layer_backward)


def _micro_batch(spec: ModelSpec, config, P: int, stream_fp32: bool, checkpointing: bool,
                 grad: bool = True, head: float = 0.0) -> tuple[float, float, float]:
    """(activations, logits, layer backward) bytes of one forward + backward through logprobs.rollout_logps:
    a micro-batch, or on the shared-prompt path config.groups_per_backward groups of it.

    grad=False: the reference pass (nothing saved: one layer's temporaries, on the shared-prompt path the
    micro-batch's KV cache, the logits chunk), returned as the first number.
    grad=True: activations = what autograd saves until backward reaches it (with checkpointing only
    each layer's input); logits = the [chunk, vocab] blocks of the head's backward, which runs first;
    layer backward = what one decoder layer's backward adds once the logits are freed (with
    checkpointing: the layer recomputed with everything saved, and its gradients). head: bytes of the output
    head's compute-dtype copy (counted with the logits: freed once the head's backward is done).
    """
    L, V, H, I = spec.num_layers, spec.vocab_size, spec.hidden_size, spec.intermediate_size
    Hq, Hkv, T = spec.q_dim, spec.kv_dim, config.max_completion_length
    ab = 4 if stream_fp32 else 2  # bytes per activation element
    n, groups, per_group = microbatch_shape(config)
    share = config.uses_shared_prompt_forward  # as the trainer: one rule, with or without checkpointing
    # a no-grad pass runs the micro-batch at once; training calls backward after every groups_per_backward
    # groups, unless top_entropy_quantile < 1 needs the whole micro-batch scored first
    if grad and config.backward_per_group:
        k = min(config.groups_per_backward, groups)
        n, groups = per_group * k, k
    tokens = n * T + groups * P if share else n * (P + T)  # tokens one forward runs through the body
    chunk = min(config.logprob_chunk_size, n * T)  # completion positions one output-head call scores
    if not grad:  # no saved tensors: one layer's temporaries, and on the shared path the micro-batch's cache
        cache = n * (P + T) * L * 2 * Hkv * ab if share else 0
        return tokens * (3 * I + 4 * H) * ab + cache + LOGITS_BLOCKS_NO_GRAD * chunk * V * 4 + head, 0.0, 0.0
    per_token = layer_activation_bytes(spec, stream_fp32, config.lora_target_modules, config.lora_r,
                                       config.lora_dropout)
    # keys/values SDPA saves: with an attention mask (always on the shared-prompt path) they are
    # expanded to all query heads, and each completion row holds its group's prompt keys as well
    if share:
        kv = n * (P + T) * 2 * Hq * ab + groups * P * 2 * Hkv * ab
    else:
        kv = tokens * 2 * Hq * ab
    layer = tokens * per_token + kv  # one layer with everything saved
    outside = tokens * 3 * H * ab  # final norm input/output and the hidden states the head reads
    grads = tokens * (I + 2 * H) * ab  # gradients alive inside a layer's backward (measured: ~1 I-sized)
    logits = LOGITS_BLOCKS_TRAIN * chunk * V * 4 + head
    if checkpointing:  # each layer's input is kept; a layer is recomputed when its backward comes
        # on the shared path the replay also needs what each layer read from the cache: the prompts' keys/values
        # and each completion row's copy of its prompt's (logprobs._rows_of), all layers, until backward
        replay_kv = L * (n + groups) * P * 2 * Hkv * ab if share else 0
        return (L + 1) * tokens * H * ab + outside + replay_kv, logits, layer + grads
    return L * layer + outside, logits, grads


def bytes_text(b: float) -> str:
    """A byte count as text: GiB with two decimals from 1 GiB up, MiB below."""
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / MiB:.0f} MiB"

