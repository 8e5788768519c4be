"""What every notebook does first: look at the hardware, pick a named preset, build the config.

    preset = choose_preset(PRESET)              # "colab-t4" on a CUDA GPU, else "cpu-tiny"
    config = notebook_config(preset, model=MODEL, **OVERRIDES)
    print(hardware_summary()); print(config_summary(config))

The presets themselves are data in grpo_lib.config.PRESETS; this module only chooses one. The choice,
first match wins: the name passed in (the notebook's PRESET parameter), the GRPO_PRESET environment
variable (CI sets GRPO_PRESET=cpu-tiny), then the hardware.
"""

from __future__ import annotations

import os
import platform

from .config import PRESETS, ConfigError, GRPOConfig

REPO_URL = "https://github.com/grpo-workbench/grpo-workbench"
"""Where the notebooks' install cell fetches grpo_lib from on Colab (outside a clone)."""

ENV_VAR = "GRPO_PRESET"
GPU_PRESET, CPU_PRESET = "colab-t4", "cpu-tiny"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_preset(override: str | None = None) -> str:
    """The preset name: `override`, else $GRPO_PRESET, else "colab-t4" with a CUDA GPU, "cpu-tiny" without."""
    name = override or os.environ.get(ENV_VAR) or (GPU_PRESET if has_cuda() else CPU_PRESET)
    if name not in PRESETS:
        source = "PRESET" if override else f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the hardware"
        raise ConfigError(f"unknown preset {name!r} (from {source}); choose one of {sorted(PRESETS)}")
    return name


def notebook_config(preset: str, model: str | None = None, **overrides) -> GRPOConfig:
    """GRPOConfig of a named preset. `model`: any Hugging Face causal LM id or local path (None keeps the
    preset's model); `overrides`: any other GRPOConfig fields, validated as usual."""
    if model is not None:
        overrides["model"] = model
    return GRPOConfig.preset(preset, **overrides)


def hardware_summary() -> str:
    """One line on what this kernel runs on: the GPU (memory, bf16 or fp16 compute) or the CPU."""
    import torch

    from .models import has_native_bf16

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dtype = "bf16" if has_native_bf16() else "fp16 (no native bf16 on this GPU)"
        return (f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
                f"{dtype} compute; torch {torch.__version__}")
    return (f"CPU: {os.cpu_count()} cores ({platform.machine()}), no CUDA GPU, fp32 compute; "
            f"torch {torch.__version__}")


SUMMARY_FIELDS = ("model", "load_in_4bit", "lora_r", "task", "prompts_per_step", "num_generations",
                  "max_completion_length", "temperature", "reward_funcs", "learning_rate", "beta", "epsilon",
                  "loss_type", "scale_rewards", "max_steps")


def config_summary(config: GRPOConfig, fields: tuple[str, ...] = SUMMARY_FIELDS) -> str:
    """The knobs a notebook reader needs to see, one `name = value` a line (config.to_yaml() has all)."""
    width = max(len(f) for f in fields)
    return "\n".join(f"{f:<{width}} = {getattr(config, f)!r}" for f in fields)
