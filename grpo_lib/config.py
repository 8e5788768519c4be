"""Every knob of a GRPO run in one flat dataclass, with named presets and validation.

Field names follow TRL's `GRPOConfig` where TRL has the same knob, so a user who knows
one knows the other (`grpo_lib.trl_bridge` maps them one to one).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields

# The choices of the string knobs, defined here once; loss.py and advantages.py import them.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
LONG_PROMPT_POLICIES = ("skip", "error")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRACKERS = ("tensorboard", "trackio", "wandb")
LR_SCHEDULERS = ("constant", "linear", "cosine")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def tracker_names(report_to) -> tuple[str, ...]:
    """report_to as TRL takes it -> a tuple of names: "wandb" -> ("wandb",); "none", ["none"], None, () -> ()
    (TRL's "none": no tracker). The names are checked by validate()."""
    names = (report_to,) if isinstance(report_to, str) else tuple(report_to or ())
    return () if names == ("none",) else names


@dataclass
class GRPOConfig:
    # --- model -----------------------------------------------------------------------------
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    """Policy: "smollm2-135m" (embedded, offline), a hub id, or a local path."""
    load_in_4bit: bool = True
    """Quantise the frozen base weights to bitsandbytes nf4 (QLoRA). ~4x less weight memory."""
    lora_r: int = 16
    """LoRA rank; 8-64 is usual. 0 trains the full model (then the reference is a frozen copy)."""
    lora_alpha: int = 32
    """LoRA scale numerator (scale = alpha / r); usually 2*r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps the ratio to the old policy exact."""
    lora_target_modules: str = "all-linear"
    """peft target spec: "all-linear" or comma-separated module names (e.g. "q_proj,v_proj")."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: less memory, ~30% more compute."""
    dtype: str = "auto"
    """Compute dtype: "auto" (bf16 on GPUs that have it, fp16 on those that do not such as a T4, fp32 on
    CPU), or "float32", "bfloat16", "float16" (fp16 trains with loss scaling)."""

    # --- data ------------------------------------------------------------------------------
    task: str = "gsm8k"
    """Prompt set: "gsm8k", or a synthetic CPU task: "larger", "successor", "addition"; or a code task (rewarded by
    running tests, "code_tests"): "functions" (synthetic one-line functions, CPU), "humaneval", "mbpp"."""
    system_prompt: str | None = None
    """Overrides the task's system prompt (None = the task's own)."""
    one_shot: bool = True
    """Prepend one solved example as a previous chat turn (helps small models with the format)."""
    num_eval_prompts: int = 64
    """Held-out prompts used by evaluate() before and after training."""
    max_prompt_length: int = 512
    """Prompts longer than this (in tokens) are skipped or refused (see long_prompts)."""
    long_prompts: str = "skip"
    """"skip" (drop with a count and a warning) or "error" for prompts over max_prompt_length."""

    # --- sampling --------------------------------------------------------------------------
    prompts_per_step: int = 4
    """Prompts (groups) sampled per training step; completions per step = prompts_per_step * G."""
    num_generations: int = 8
    """G, completions per prompt. GRPO needs >= 2; 4-16 is usual."""
    max_completion_length: int = 256
    """New tokens per completion at most; longer ones are truncated (flagged)."""
    temperature: float = 1.0
    """Sampling temperature; also divides the logits when log-probs are scored, as in TRL."""
    top_p: float = 1.0
    """Nucleus sampling mass."""

    # --- rewards ---------------------------------------------------------------------------
    reward_funcs: tuple[str, ...] = ("format", "answer")
    """Names from grpo_lib.rewards.REWARD_FUNCS (callables can be passed to the trainer instead)."""
    reward_weights: tuple[float, ...] | None = None
    """One weight per reward function (None = all 1.0)."""
    reward_timeout_s: float = 30.0
    """Wall-clock limit for one call of one reward function; a slower call is an error."""

    # --- optimisation ----------------------------------------------------------------------
    learning_rate: float = 1e-5
    """AdamW learning rate; LoRA runs use 1e-5..1e-4, full fine-tuning 1e-6..1e-5."""
    lr_scheduler_type: str = "constant"
    """"constant", "linear" (decay to 0 at max_steps) or "cosine"."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per update: the step's N completions are split into this many chunks."""
    num_iterations: int = 1
    """mu, optimiser updates per generation batch (old log-probs stored once)."""
    beta: float = 0.04
    """KL coefficient to the reference. 0 disables the reference pass (DAPO, Dr. GRPO)."""
    epsilon: float = 0.2
    """PPO clip range (lower side, and upper unless epsilon_high is set)."""
    epsilon_high: float | None = None
    """Upper clip (DAPO's clip-higher, e.g. 0.28); None = epsilon. With loss_type="cispo" it is the cap of the
    importance weight itself, not 1 + epsilon_high (epsilon_max of MiniMax-M1 / ScaleRL, e.g. 5.0)."""
    loss_type: str = "grpo"
    """Token aggregation: "grpo" (seq mean, then mean), "bnpo"/"dapo" (token mean), "dr_grpo"; or "cispo"
    (MiniMax-M1, arXiv 2506.13585): clip the detached importance weight at epsilon_high instead of the update,
    loss -min(rho, epsilon_high) A logp, token mean over the step as "dapo"."""
    importance_sampling_level: str = "token"
    """"token": one ratio per token (PPO, GRPO); "sequence": one per completion, the ratio of its
    length-normalised likelihoods exp(mean_t log rho_t), clipped per sequence (GSPO, arXiv 2507.18071; use
    with loss_type="grpo", and much smaller epsilons, e.g. 3e-4 / 4e-4)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length without EOS out of the loss (they still count in their
    group's advantages); DAPO's overlong filtering (arXiv 2503.14476). Usually on with long reasoning."""
    top_entropy_quantile: float = 1.0
    """rho in [0, 1]: train only on the tokens whose policy entropy is at or above the (1 - rho)-quantile of the
    micro-batch's tokens ("Beyond the 80/20 rule", arXiv 2506.01939, recommends 0.2); 1.0 = every token."""
    scale_rewards: str = "group"
    """Advantage scale: std over the "group", over the "batch", or "none" (Dr. GRPO)."""
    max_steps: int = 200
    """Training steps (one generation batch each)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop zero-variance groups (no learning signal) and sample more prompts until
    the step has prompts_per_step informative groups, or max_resample_rounds extra rounds were spent."""
    max_resample_rounds: int = 3
    """With dynamic_sampling: extra generation rounds a step may spend looking for informative groups."""
    saturation_threshold: float | None = None
    """Stop the run early (adapter saved as usual) once the share of zero-variance groups has stayed at or
    above this (e.g. 0.9) for saturation_patience steps in a row; None never stops early."""
    saturation_patience: int = 3
    """Steps in a row above saturation_threshold before the run stops."""
    max_skipped_steps: int = 10
    """Stop the run once fp16 loss scaling has skipped this many optimiser steps in a row (inf/NaN gradients:
    the log's amp/step_skipped); 0 never stops. GradScaler starts at 2^16 and halves its scale at each skip, so
    a few skips at the start are normal; 10 in a row (scale 2^6) means the forward or the loss overflows."""
    seed: int = 0
    """Seeds python, numpy and torch (sampling included)."""

    # --- performance -----------------------------------------------------------------------
    logprob_chunk_size: int = 1024
    """Completion positions per log-softmax chunk: bounds the [chunk, vocab] logits memory."""
    share_prompt_forward: bool = True
    """Run each group's prompt once and the G completions on its KV cache (same math)."""
    groups_per_backward: int = 2
    """On the shared-prompt path, groups per forward + backward (same math): more runs larger matrix products
    (2 groups: ~10% faster training on CPU than 1), each holds more activations (memory.estimate counts them)."""

    # --- run directory ---------------------------------------------------------------------
    save_steps: int = 50
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    save_total_limit: int = 2
    """Checkpoints kept; older ones are pruned."""
    report_to: tuple[str, ...] = ()
    """Where per-step metrics also go (TRL's name): "tensorboard", "trackio", "wandb". The run log stays the
    source of truth; () sends them nowhere else."""

    # ---------------------------------------------------------------------------------------

    def __post_init__(self):
        # tuples, not lists, so the config stays hashable and comparable after a JSON round trip
        self.reward_funcs = tuple(self.reward_funcs)
        self.report_to = tracker_names(self.report_to)
        if self.reward_weights is not None:
            self.reward_weights = tuple(float(w) for w in self.reward_weights)
        validate(self)

    @property
    def batch_size(self) -> int:
        """Completions per step, N = prompts_per_step * num_generations."""
        return self.prompts_per_step * self.num_generations

    @property
    def uses_shared_prompt_forward(self) -> bool:
        """Whether log-probs run each group's prompt once and its G completions on the prompt's KV cache
        (logprobs.shared_prompt_logps) instead of every completion after its own copy of the prompt. The one
        statement of the rule: the trainer, the memory planner, the GPU check and the notebooks ask this. It is
        share_prompt_forward alone: the shared path also runs under gradient checkpointing (its KV cache is one
        a checkpointed layer can replay, logprobs.cache_through_checkpointing)."""
        return self.share_prompt_forward

    @property
    def backward_per_group(self) -> bool:
        """Whether training calls backward every groups_per_backward groups of a micro-batch (trainer.
        _backward_parts): on the shared-prompt path, unless top_entropy_quantile < 1 (its quantile is over all
        of the micro-batch's tokens, so they are all scored before any backward)."""
        return self.uses_shared_prompt_forward and self.top_entropy_quantile == 1.0

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def replace(self, **changes) -> "GRPOConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "GRPOConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_yaml(self, path: str | None = None) -> str:
        """The config as YAML (the file format of `--config FILE`, read by both trainers)."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "GRPOConfig":
        """Read a YAML config file. It may name a `preset:` whose fields the file's other keys override."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        except OSError as e:
            raise ConfigError(f"config file {path}: cannot be read ({e.strerror or e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(d).__name__}")
        preset = d.pop("preset", None)
        base = PRESETS[preset] if preset in PRESETS else {}
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"{path}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        try:
            return cls.from_dict({**base, **d, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def preset(cls, name: str, **overrides) -> "GRPOConfig":
        """A named preset (see PRESETS) with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Presets are data, not `if cpu:` branches. "colab-t4" is the class default, spelled out.
PRESETS: dict[str, dict] = {
    "colab-t4": dict(),
    "cpu-tiny": dict(
        model="smollm2-135m",
        load_in_4bit=False,
        lora_r=16,
        lora_alpha=32,
        gradient_checkpointing=False,
        task="larger",
        max_prompt_length=256,
        prompts_per_step=4,
        num_generations=8,
        max_completion_length=24,
        temperature=1.0,
        reward_funcs=("format", "answer"),
        learning_rate=2e-4,
        beta=0.04,
        max_steps=30,
        num_eval_prompts=64,
        save_steps=10,
    ),
    # the embedded model learns to write small functions that pass their asserts (data.code_rows)
    "cpu-code": dict(
        model="smollm2-135m",
        load_in_4bit=False,
        lora_r=16,
        lora_alpha=32,
        gradient_checkpointing=False,
        task="functions",
        one_shot=False,  # the solved example changed little (base pass rate 0.42 with, 0.44 without): a shorter prompt
        max_prompt_length=256,
        prompts_per_step=4,
        num_generations=8,
        max_completion_length=32,  # the longest reference solution is 30 tokens: room to answer, none to ramble
        temperature=1.0,
        reward_funcs=("code_tests", "code_syntax"),
        learning_rate=3e-4,
        beta=0.04,
        max_steps=20,  # the sampled completions pass 0.84 of their tests by step 5, near 1 from step 12
        num_eval_prompts=64,
        save_steps=10,
    ),
    # colab-t4 for code: Qwen2.5-Coder-1.5B-Instruct (4-bit + LoRA) continuing HumanEval's functions
    "colab-t4-code": dict(
        model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        task="humaneval",
        reward_funcs=("code_tests",),  # HumanEval prompts are <= 400 tokens, 163 of 164 solutions <= 256 tokens
        num_eval_prompts=33,
        max_steps=100,
        save_steps=25,
    ),
}


# ----------------------------------------------------------------------------------------------
# validation: every field, with its name and the fix in the message
# ----------------------------------------------------------------------------------------------

def _runtime_types(hint) -> tuple[type, ...]:
    """The isinstance() classes of a field annotation: `int` -> (int,), `str | None` -> (str, NoneType),
    `tuple[str, ...]` -> (tuple,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    return (typing.get_origin(hint) or hint,)


def field_types() -> dict[str, tuple[type, ...]]:
    """Each GRPOConfig field's accepted classes, read off the dataclass annotations (one source of truth)."""
    hints = typing.get_type_hints(GRPOConfig)
    return {f.name: _runtime_types(hints[f.name]) for f in fields(GRPOConfig)}


def _check_type(name: str, value, expected: tuple[type, ...]) -> None:
    wanted = " or ".join("None" if t is type(None) else t.__name__ for t in expected)
    if bool not in expected and isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is a bool; expected {wanted}")
    if float in expected and isinstance(value, int):
        return  # an int is a fine float
    if not isinstance(value, expected):
        raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {wanted}")


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {rule}")


def validate(c: GRPOConfig) -> None:
    """Raise ConfigError naming the first invalid field and how to fix it."""
    for name, expected in field_types().items():
        _check_type(name, getattr(c, name), expected)
    _require(c.num_generations >= 2, "num_generations", c.num_generations,
             "GRPO compares completions inside a group, so it needs at least 2 (4-16 is usual)")
    for name in ("prompts_per_step", "max_completion_length", "max_prompt_length", "max_steps",
                 "num_iterations", "gradient_accumulation_steps", "logprob_chunk_size", "save_total_limit",
                 "groups_per_backward"):
        _require(getattr(c, name) >= 1, name, getattr(c, name), "must be >= 1")
    for name in ("lora_r", "warmup_steps", "save_steps", "num_eval_prompts"):
        _require(getattr(c, name) >= 0, name, getattr(c, name), "must be >= 0")
    _require(c.lora_r == 0 or c.lora_alpha > 0, "lora_alpha", c.lora_alpha, "must be > 0 when lora_r > 0")
    _require(c.lora_r > 0 or not c.load_in_4bit, "lora_r", c.lora_r,
             "4-bit weights cannot be trained: with load_in_4bit=True set lora_r > 0 (QLoRA), or load_in_4bit=False "
             "for full fine-tuning")
    _require(0.0 <= c.lora_dropout < 1.0, "lora_dropout", c.lora_dropout, "must be in [0, 1)")
    _require(c.batch_size % c.gradient_accumulation_steps == 0, "gradient_accumulation_steps",
             c.gradient_accumulation_steps,
             f"must divide prompts_per_step * num_generations = {c.batch_size} so micro-batches are equal")
    _require(c.temperature > 0, "temperature", c.temperature, "must be > 0 (use a small value for near-greedy)")
    _require(0 < c.top_p <= 1, "top_p", c.top_p, "must be in (0, 1]")
    _require(c.learning_rate > 0, "learning_rate", c.learning_rate, "must be > 0 (1e-6..1e-4 is usual)")
    _require(c.weight_decay >= 0, "weight_decay", c.weight_decay, "must be >= 0")
    _require(c.max_grad_norm >= 0, "max_grad_norm", c.max_grad_norm, "must be >= 0 (0 disables clipping)")
    _require(c.beta >= 0, "beta", c.beta, "must be >= 0 (0 disables the KL term)")
    _require(0 <= c.epsilon < 1, "epsilon", c.epsilon, "must be in [0, 1) (0.2 is usual)")
    _require(c.epsilon_high is None or c.epsilon_high >= 0, "epsilon_high", c.epsilon_high,
             "must be >= 0 or None (DAPO uses 0.28)")
    _require(c.loss_type in LOSS_TYPES, "loss_type", c.loss_type, f"choose one of {LOSS_TYPES}")
    _require(c.loss_type != "cispo" or (c.epsilon_high is not None and c.epsilon_high >= 1), "epsilon_high",
             c.epsilon_high, "loss_type='cispo' caps the importance weight at epsilon_high itself (not 1 + "
             "epsilon_high): set it >= 1, e.g. 5.0 (MiniMax-M1, ScaleRL)")
    _require(c.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
             c.importance_sampling_level, f"choose one of {IMPORTANCE_SAMPLING_LEVELS}")
    _require(0 <= c.top_entropy_quantile <= 1, "top_entropy_quantile", c.top_entropy_quantile,
             "must be in [0, 1] (the share of highest-entropy tokens trained on; 0.2 is usual, 1.0 = all)")
    _require(c.scale_rewards in SCALE_REWARDS, "scale_rewards", c.scale_rewards, f"choose one of {SCALE_REWARDS}")
    _require(c.long_prompts in LONG_PROMPT_POLICIES, "long_prompts", c.long_prompts,
             f"choose one of {LONG_PROMPT_POLICIES}")
    _require(c.lr_scheduler_type in LR_SCHEDULERS, "lr_scheduler_type", c.lr_scheduler_type,
             f"choose one of {LR_SCHEDULERS}")
    _require(c.dtype in DTYPES, "dtype", c.dtype, f"choose one of {DTYPES}")
    _require(c.max_resample_rounds >= 0, "max_resample_rounds", c.max_resample_rounds, "must be >= 0")
    _require(c.saturation_threshold is None or 0 < c.saturation_threshold <= 1, "saturation_threshold",
             c.saturation_threshold, "must be in (0, 1] (a share of zero-variance groups, e.g. 0.9), or None")
    _require(c.saturation_patience >= 1, "saturation_patience", c.saturation_patience, "must be >= 1")
    _require(c.max_skipped_steps >= 0, "max_skipped_steps", c.max_skipped_steps,
             "must be >= 0 (skipped fp16 steps in a row before the run stops; 0 never stops)")
    _require(all(t in TRACKERS for t in c.report_to), "report_to", c.report_to,
             f"name trackers from {TRACKERS} (or none: \"none\" or [])")
    _require(c.reward_timeout_s > 0, "reward_timeout_s", c.reward_timeout_s, "must be > 0 seconds")
    _require(len(c.reward_funcs) >= 1, "reward_funcs", c.reward_funcs, "name at least one reward function")
    _require(all(isinstance(n, str) for n in c.reward_funcs), "reward_funcs", c.reward_funcs,
             "names must be strings (pass callables to GRPOTrainer(reward_funcs=...) instead)")
    if c.reward_weights is not None:
        _require(len(c.reward_weights) == len(c.reward_funcs), "reward_weights", c.reward_weights,
                 f"needs one weight per reward function ({len(c.reward_funcs)})")
