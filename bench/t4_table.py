"""The memory planner's predictions for the Qwen2.5 family at the colab-t4 preset, as a markdown table.

    python bench/t4_table.py                     # the preset as it is
    python bench/t4_table.py --set gradient_accumulation_steps=4

Nothing is loaded or allocated: grpo_lib.memory.estimate works from the built-in architecture table.
"""

from __future__ import annotations

import argparse

from grpo_lib import memory, memory_advice
from grpo_lib.cli import parse_overrides
from grpo_lib.config import GRPOConfig

MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-3B-Instruct",
          "Qwen/Qwen2.5-7B-Instruct")
ROWS = (("weights", "weights (nf4 + fp32 embeddings)"), ("lora_params", "LoRA params"),
        ("gradients", "gradients"), ("optimizer_states", "AdamW states"), ("cuda_context", "CUDA context"),
        ("kv_cache", "KV cache (generation)"), ("sampling_buffers", "sampling buffers (generation)"),
        ("reference_pass", "reference forward"), ("activations", "activations (training)"),
        ("logits", "logits chunks (training, start of backward)"),
        ("layer_backward", "layer backward (training, after the logits)"))


def gib(b: float) -> str:
    return f"{b / memory.GiB:.2f}"


def table(config: GRPOConfig, device_bytes: int) -> str:
    reports = [memory.estimate(config, m, device_bytes) for m in MODELS]
    head = "| GiB | " + " | ".join(m.split("/")[-1].replace("-Instruct", "") for m in MODELS) + " |"
    lines = [head, "|" + "---|" * (len(MODELS) + 1)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(gib(r.components[key]) for r in reports) + " |")
    lines.append("| activations + layer backward without checkpointing (not used) | "
                 + " | ".join(gib(r.activations_no_checkpointing) for r in reports) + " |")
    lines.append("| training phase = activations + max(logits, layer backward) | "
                 + " | ".join(gib(r.phases["training"]) for r in reports) + " |")
    lines.append("| **predicted peak** (resident + largest phase) | "
                 + " | ".join(f"**{gib(r.total_bytes)}**" for r in reports) + " |")
    lines.append("| largest phase | " + " | ".join(r.peak_phase for r in reports) + " |")
    lines.append(f"| verdict on {gib(device_bytes)} GiB | "
                 + " | ".join(memory_advice._verdict(r).split(" (")[0].split(":")[0] for r in reports) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="colab-t4")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--device-gib", type=float, default=memory.T4_REPORTED_BYTES / memory.GiB,
                    help="device memory (default: what a Colab T4 reports, 14.56 GiB)")
    args = ap.parse_args(argv)
    config = GRPOConfig.preset(args.preset, **parse_overrides(args.set))
    print(table(config, int(args.device_gib * memory.GiB)))
    r = memory.estimate(config, MODELS[-1], int(args.device_gib * memory.GiB))
    if not r.fits:
        print(f"\n{MODELS[-1]}: " + "; ".join(memory_advice.suggest_cheaper(config, MODELS[-1], r.device_bytes)[:4]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
