"""The memory planner's advice: the report as a table with its verdict, cheaper settings, and the refusal
of a run that would not fit.

    verdict   fits (below TIGHT of the device), fits tightly, or does NOT fit
    cheaper   single changes that lower grpo_lib.memory.estimate's peak, those that fit first; a greedy
              combination when none fits alone; smaller models of grpo_lib.model_specs.MODEL_SPECS
"""

from __future__ import annotations

from .memory import COMPONENTS, MemoryReport, bytes_text, estimate
from .model_specs import MODEL_SPECS, ModelSpec, model_spec

TIGHT = 0.93  # above this share of the device, PyTorch's caching allocator's fragmentation may tip it over

COMPONENT_LABELS = {"weights": "weights", "lora_params": "LoRA parameters", "gradients": "gradients",
          "optimizer_states": "AdamW states", "cuda_context": "CUDA context", "kv_cache": "KV cache",
          "sampling_buffers": "sampling buffers", "merged_weights": "merged weights",
          "reference_pass": "reference forward",
          "activations": "activations", "logits": "logits chunks", "layer_backward": "layer backward"}


def format_report(report: MemoryReport) -> str:
    """The report as a plain-text table: components by phase, the peak and the verdict."""
    s = report.settings
    backward = f" (a backward every {s['groups_per_backward']} group(s))" if s["backward_per_group"] else ""
    quant = "nf4 4-bit" if s["load_in_4bit"] else ("fp32" if report.device == "cpu" else "bf16/fp16")
    lines = [
        f"{report.model} ({s['params'] / 1e9:.2f}B params, {quant}), LoRA r={s['lora_r']} "
        f"({s['trainable_params'] / 1e6:.1f}M trainable) on {report.device}",
        f"{s['completions']} completions/step = {s['completions'] // s['num_generations']} prompts x "
        f"G={s['num_generations']}, prompt ~{s['prompt_tokens']} + completion {s['completion_tokens']} tokens, "
        f"micro-batch {s['micro_batch']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
        f"{', shared prompt forward' if s['share_prompt_forward'] else ''}"
        f"{backward}",
        "",
        f"{'component':20} {'alive during':13} {'bytes':>10}",
    ]
    for phase in ("always", "generation", "reference", "training"):
        for name, (when, _) in COMPONENTS.items():
            if when == phase and (report.components[name] or phase != "always"):
                lines.append(f"{COMPONENT_LABELS[name]:20} {when:13} {bytes_text(report.components[name]):>10}")
    ck, plain = report.activations_checkpointing, report.activations_no_checkpointing
    lines.append(f"{'':20} (training = activations + the larger of logits chunks and layer backward;")
    lines.append(f"{'':20}  activations + layer backward: {bytes_text(plain)} without checkpointing, {bytes_text(ck)} with)")
    phases = report.phases
    lines += [
        "-" * 45,
        f"{'always resident':34} {bytes_text(report.persistent_bytes):>10}",
        *(f"{'+ ' + p + ' phase' + (' (largest)' if p == report.peak_phase else ''):34} {bytes_text(b):>10}"
          for p, b in phases.items()),
        f"{'predicted peak':34} {bytes_text(report.total_bytes):>10}",
        f"{'device memory':34} {bytes_text(report.device_bytes):>10}",
        f"verdict: {_verdict(report)}",
    ]
    lines += [f"note: {n}" for n in report.notes]
    if not report.fits:
        lines.append("cheaper settings: grpo_lib.memory_advice.suggest_cheaper(config, model, device_bytes)")
    return "\n".join(lines)


def _verdict(report: MemoryReport) -> str:
    share = report.total_bytes / report.device_bytes
    if not report.fits:
        return f"does NOT fit ({100 * share:.0f}% of the device)"
    if _fits_tightly(report):
        return (f"fits, but tightly ({100 * share:.0f}% of the device): allocator fragmentation can push "
                f"it over; take one of the cheaper settings to be safe")
    return f"fits ({100 * share:.0f}% of the device)"


def _fits_tightly(report: MemoryReport) -> bool:
    """Fits, but above TIGHT of the device: the caching allocator's fragmentation may still tip it over."""
    return report.fits and report.total_bytes > TIGHT * report.device_bytes


def _options(config, spec: ModelSpec) -> list[tuple[dict, str]]:
    """Single changes that save memory, ordered by how little they change training."""
    out = []
    if config.groups_per_backward > 1 and config.backward_per_group:
        out.append(({"groups_per_backward": 1}, "one group per backward: same math, smaller matrix products"))
    if not config.gradient_checkpointing:
        out.append(({"gradient_checkpointing": True}, "recompute activations in backward: ~30% slower, same math"))
    N = config.batch_size
    for k in (2, 4, 8, 16):
        gas = config.gradient_accumulation_steps * k
        if gas <= N and N % gas == 0:
            out.append(({"gradient_accumulation_steps": gas}, f"{N // gas} completions per micro-batch: same math, "
                                                              f"somewhat slower"))
    if config.logprob_chunk_size > 256:
        out.append(({"logprob_chunk_size": 256}, "fewer [chunk, vocab] logits alive: same math"))
    if not config.load_in_4bit:
        out.append(({"load_in_4bit": True}, "nf4 base weights (QLoRA): ~4x smaller weights, slightly different model"))
    if config.max_completion_length >= 64:
        out.append(({"max_completion_length": config.max_completion_length // 2},
                    "shorter completions: long reasoning gets truncated"))
    if config.num_generations >= 4:
        out.append(({"num_generations": config.num_generations // 2},
                    "smaller groups: noisier advantages (keep G >= 4)"))
    if config.prompts_per_step >= 2:
        out.append(({"prompts_per_step": config.prompts_per_step // 2}, "fewer prompts per step: noisier gradient"))
    return out


def suggest_cheaper(config, model_or_spec=None, device_bytes: int | None = None, *, device: str = "cuda",
                    prompt_length: int | None = None) -> list[str]:
    """Advice: settings that lower the predicted peak, each with its prediction, those that fit first
    (in order of how little they change training), then a combination if no single change fits, then
    smaller models of the built-in table that fit."""
    spec = model_spec(config.model if model_or_spec is None else model_or_spec)
    kw = {"device": device, "prompt_length": prompt_length}
    base = estimate(config, spec, device_bytes, **kw)
    device_bytes = base.device_bytes

    def verdict(r):
        word = "does not fit" if not r.fits else ("fits tightly" if _fits_tightly(r) else "fits")
        return f"{bytes_text(r.total_bytes)} ({word} in {bytes_text(device_bytes)})"

    lines = [f"now: {verdict(base)}"]
    groups = ([], [], [])  # fits with headroom, fits tightly, does not fit
    for changes, why in _options(config, spec):
        r = estimate(config.replace(**changes), spec, device_bytes, **kw)
        if r.total_bytes < base.total_bytes:
            rank = 2 if not r.fits else int(_fits_tightly(r))
            groups[rank].append(f"{_changes(changes)}: {verdict(r)} - {why}")
    fitting = groups[0] + groups[1]
    lines += fitting + groups[2]
    if not base.fits and not fitting:  # greedily combine the changes, cheapest first
        combined, best = {}, base
        for changes, _ in _options(config, spec):
            try:
                trial = estimate(config.replace(**{**combined, **changes}), spec, device_bytes, **kw)
            except ValueError:  # ConfigError: e.g. gradient_accumulation_steps no longer divides the batch
                continue
            if trial.total_bytes < best.total_bytes:
                combined, best = {**combined, **changes}, trial
                if best.fits:
                    break
        lines.append(f"together {_changes(combined)}: {verdict(best)}")
    if not base.fits:  # the two largest built-in models that fit
        smaller = sorted((s for s in MODEL_SPECS.values() if s.num_params < spec.num_params),
                         key=lambda s: -s.num_params)
        fit = [(s, r) for s in smaller if (r := estimate(config, s, device_bytes, **kw)).fits]
        lines += [f"smaller model {s.name}: {verdict(r)}" for s, r in fit[:2]]
    return lines


def _changes(changes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items())


class MemoryPlanError(RuntimeError):
    """The configuration would not fit on this GPU; the message holds the plan and cheaper settings."""


def plan_or_refuse(config) -> MemoryReport | None:
    """The plan of one training step of `config` on this machine's GPU, checked before anything is loaded
    (the command line and notebook 05 both call this). Raises MemoryPlanError, with the plan and
    cheaper settings, when it would not fit. None without a CUDA GPU: the planner covers GPUs (see
    `python -m grpo_lib plan --preset colab-t4` for a T4)."""
    import torch

    if not torch.cuda.is_available():
        return None
    spec = model_spec(config.model)
    report = estimate(config, spec)
    if not report.fits:
        advice = suggest_cheaper(config, spec, report.device_bytes)
        raise MemoryPlanError(f"{format_report(report)}\n\nThis configuration would not fit on this GPU. "
                              f"Cheaper settings:\n  " + "\n  ".join(advice))
    return report
