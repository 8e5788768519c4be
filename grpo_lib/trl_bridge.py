"""The workbench's config, data and reward functions handed to TRL's GRPOTrainer, for multi-GPU scale-out.

grpo_lib's own trainer is written to be read; TRL's is written to scale (DeepSpeed ZeRO, vLLM). This module
only translates between them and re-implements nothing of TRL:

    to_trl_config(config)             GRPOConfig -> trl.GRPOConfig: every knob mapped, or refused
    from_trl_config(trl_cfg, base)    the inverse, for the mapped knobs
    make_trl_trainer(config, model, tokenizer, ...)    trl.GRPOTrainer with the workbench's rewards and data

Every GRPOConfig field is in exactly one of four tables: SAME (same name, meaning and units in TRL),
CONVERTED (TRL spells or counts it differently), HANDLED (it shapes what is handed to TRL: the model, the
LoRA adapter, the dataset, the reward callables) and NO_COUNTERPART (with the reason; a non-default value of
one that changes training is refused). The reward functions pass through unchanged: they already have TRL's
signature `fn(prompts, completions, **columns)`, and TRL logs each as `rewards/<fn.__name__>/mean`.
"""

from __future__ import annotations

import os
from dataclasses import fields

from .config import ConfigError, GRPOConfig

# ----------------------------------------------------------------------------------------------
# the tables: every GRPOConfig field in exactly one
# ----------------------------------------------------------------------------------------------

SAME = (
    "num_generations", "max_completion_length", "temperature", "top_p", "learning_rate", "weight_decay",
    "max_grad_norm", "gradient_accumulation_steps", "num_iterations", "beta", "epsilon", "epsilon_high",
    "loss_type", "scale_rewards", "seed", "save_total_limit", "importance_sampling_level", "mask_truncated_completions",
    "top_entropy_quantile",
)
"""Knobs with the same name, meaning and units in trl.GRPOConfig."""

CONVERTED: dict[str, tuple[str, str]] = {
    "prompts_per_step": ("per_device_train_batch_size",
                         "TRL's batch counts completions per process and micro-batch: "
                         "prompts_per_step * num_generations / (processes * gradient_accumulation_steps)"),
    "max_steps": ("max_steps", "TRL counts optimiser updates, num_iterations per generation batch: x num_iterations"),
    "warmup_steps": ("warmup_steps", "optimiser updates, as max_steps: x num_iterations"),
    "save_steps": ("save_steps", "x num_iterations; TRL also saves at the last step, and 0 = only there"),
    "lr_scheduler_type": ("lr_scheduler_type", "'constant' after a warm-up is transformers' 'constant_with_warmup'"),
    "gradient_checkpointing": ("activation_checkpointing", "transformers 5's name"),
    "reward_weights": ("reward_weights", "a list in TRL"),
    "report_to": ("report_to", "a list in TRL; none = 'none'"),
}
"""grpo_lib knob -> (TRL field, how the value is converted)."""

HANDLED: dict[str, str] = {
    "model": "load_model: from_pretrained of the hub id or folder (an embedded name -> its cached folder)",
    "load_in_4bit": "load_model: bitsandbytes nf4 quantization_config, device_map on the local rank",
    "lora_r": "lora_peft_config -> GRPOTrainer(peft_config=); 0 = full fine-tuning, no adapter",
    "lora_alpha": "lora_peft_config",
    "lora_dropout": "lora_peft_config",
    "lora_target_modules": "lora_peft_config",
    "dtype": "model_init_kwargs: the weights' and 4-bit compute dtype; runtime_fields: TRL's bf16 / fp16 flags",
    "task": "make_trl_trainer: data.task_rows -> the train dataset",
    "system_prompt": "data.task_rows",
    "one_shot": "data.task_rows",
    "max_prompt_length": "make_trl_trainer: data.filter_long_prompts before TRL (TRL 1.16 has no such field)",
    "long_prompts": "make_trl_trainer: data.filter_long_prompts",
    "reward_funcs": "make_trl_trainer: rewards.resolve_reward_funcs -> GRPOTrainer(reward_funcs=)",
}
"""grpo_lib knob -> where the bridge applies it (not a trl.GRPOConfig field)."""

NO_COUNTERPART: dict[str, tuple[bool, str]] = {
    "reward_timeout_s": (True, "TRL calls reward functions without a time limit; keep the default here and put "
                               "the limit inside a reward function that may hang"),
    "num_eval_prompts": (False, "evaluation, not training: the TRL path runs no before/after evaluation "
                                "(grpo_lib.eval.evaluate scores the saved adapter)"),
    "logprob_chunk_size": (False, "how the workbench bounds logits memory; TRL computes the same log-probs its way"),
    "share_prompt_forward": (False, "a workbench speed-up with the same math; TRL runs prompt + completion in one "
                                    "forward"),
    "groups_per_backward": (False, "a workbench speed/memory trade-off with the same math; TRL runs each "
                                   "micro-batch in one forward"),
    "dynamic_sampling": (True, "TRL 1.16 has no dynamic sampling (DAPO): every sampled group is trained on"),
    "max_resample_rounds": (False, "only used by dynamic_sampling"),
    "saturation_threshold": (False, "TRL runs until max_steps; stop it yourself (python -m grpo_lib doctor "
                                    "OUTPUT_DIR reads TRL's trainer_state.json and shows saturation)"),
    "saturation_patience": (False, "only used by saturation_threshold"),
    "max_skipped_steps": (False, "TRL's Trainer goes on through skipped fp16 steps; its logs show the loss "
                                 "(python -m grpo_lib doctor reads them)"),
}
"""grpo_lib knob -> (refuse a non-default value?, why TRL has no counterpart)."""

PINNED: dict[str, object] = {
    "use_bias_correction_kl": False,  # grpo_lib's KL term is plain k3 (loss.k3_kl), not weighted by the ratio
    "multi_objective_aggregation": "sum_then_normalize",  # weighted sum, then z-score (rewards.combine_rewards)
    "delta": None,  # no two-sided clip
    "entropy_coef": 0.0,
    "top_k": 0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "remove_unused_columns": False,  # the reward functions read the dataset's other columns (answer)
}
"""TRL-only knobs set to the workbench's math (all TRL defaults but use_bias_correction_kl). They may be
overridden for a run at scale; from_trl_config then refuses the result, which grpo_lib cannot express."""

RESERVED: dict[str, str] = {
    "steps_per_generation": "gradient_accumulation_steps",
    "generation_batch_size": "prompts_per_step",
    "save_strategy": "save_steps",
    "gradient_checkpointing": "gradient_checkpointing",  # transformers' old name of activation_checkpointing
}
"""TRL fields the mapping sets besides the CONVERTED ones -> the grpo_lib knob that decides them."""


def check_tables() -> None:
    """Every GRPOConfig field in exactly one table (a field added to config.py must be added here)."""
    tables = {"SAME": set(SAME), "CONVERTED": set(CONVERTED), "HANDLED": set(HANDLED),
              "NO_COUNTERPART": set(NO_COUNTERPART)}
    for f in fields(GRPOConfig):
        homes = [name for name, names in tables.items() if f.name in names]
        if len(homes) != 1:
            raise ConfigError(f"GRPOConfig.{f.name} is in {homes or 'no table'} of grpo_lib.trl_bridge; put it in "
                              f"exactly one of SAME, CONVERTED, HANDLED, NO_COUNTERPART")
    stale = set().union(*tables.values()) - {f.name for f in fields(GRPOConfig)}
    if stale:
        raise ConfigError(f"grpo_lib.trl_bridge maps {sorted(stale)}, which GRPOConfig no longer has")


# ----------------------------------------------------------------------------------------------
# grpo_lib -> TRL
# ----------------------------------------------------------------------------------------------


def world_size() -> int:
    """Processes of this run: `accelerate launch` and torchrun set WORLD_SIZE; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_expressible(config: GRPOConfig) -> None:
    """Refuse a non-default value of a knob that changes training and that TRL cannot express."""
    check_tables()
    default = GRPOConfig()
    for name, (refuse, why) in NO_COUNTERPART.items():
        if refuse and getattr(config, name) != getattr(default, name):
            raise ConfigError(f"{name}={getattr(config, name)!r} has no TRL counterpart ({why}); "
                              f"remove it from the config to train with TRL (default {getattr(default, name)!r})")


def per_device_batch_size(config: GRPOConfig, num_processes: int) -> int:
    """Completions per process per micro-batch: N = prompts_per_step * G split over processes and micro-batches."""
    chunks = num_processes * config.gradient_accumulation_steps
    if config.batch_size % chunks:
        raise ConfigError(
            f"prompts_per_step * num_generations = {config.batch_size} completions per step must split evenly over "
            f"{num_processes} process(es) x gradient_accumulation_steps={config.gradient_accumulation_steps}; "
            f"change prompts_per_step, gradient_accumulation_steps or the number of processes")
    return config.batch_size // chunks


def trl_fields(config: GRPOConfig, num_processes: int = 1) -> dict:
    """The trl.GRPOConfig keyword arguments that carry the SAME and CONVERTED knobs."""
    mu = config.num_iterations  # TRL's steps are optimiser updates, mu per generation batch
    out = {name: getattr(config, name) for name in SAME}
    out.update({
        "per_device_train_batch_size": per_device_batch_size(config, num_processes),
        "steps_per_generation": config.gradient_accumulation_steps,  # one generation batch per grpo_lib step
        "max_steps": config.max_steps * mu,
        "warmup_steps": config.warmup_steps * mu,
        "save_strategy": "steps",
        "save_steps": config.save_steps * mu,
        "lr_scheduler_type": ("constant_with_warmup" if config.lr_scheduler_type == "constant" and config.warmup_steps
                              else config.lr_scheduler_type),
        "activation_checkpointing": config.gradient_checkpointing,
        "reward_weights": None if config.reward_weights is None else list(config.reward_weights),
        "report_to": list(config.report_to) or "none",
    })
    return out


def runtime_fields(output_dir: str, dtype: str = "auto") -> dict:
    """Settings of the run, not of the algorithm: where it writes, what it logs, the precision of the device
    (config.dtype on the GPU: bf16 where native, fp16 autocast with loss scaling on a T4)."""
    import torch

    from .models import compute_dtype

    if not torch.cuda.is_available():
        precision = {"use_cpu": True, "bf16": False, "fp16": False}
    else:
        amp = compute_dtype("cuda", dtype)
        precision = {"bf16": amp == torch.bfloat16, "fp16": amp == torch.float16}
    return {"output_dir": str(output_dir), "logging_steps": 1, **precision}


def to_trl_config(config: GRPOConfig, output_dir: str = "trl_output", *, num_processes: int | None = None,
                  **trl_overrides):
    """The trl.GRPOConfig of a grpo_lib config.

    num_processes: defaults to $WORLD_SIZE (set by `accelerate launch`). trl_overrides: TRL-only settings
    (use_vllm=True, vllm_mode="server", report_to="wandb", ...); a knob grpo_lib has must be set in `config`.
    One grpo_lib step = one TRL generation batch of prompts_per_step * num_generations completions on all
    processes together, and num_iterations TRL optimiser steps.
    """
    import trl

    check_expressible(config)
    num_processes = num_processes or world_size()
    mapped = trl_fields(config, num_processes)
    _check_overrides(trl_overrides, set(mapped), {f.name for f in fields(trl.GRPOConfig)})
    args = trl.GRPOConfig(**{**PINNED, **runtime_fields(output_dir, config.dtype), **trl_overrides, **mapped})
    if args.generation_batch_size != config.batch_size:
        raise ConfigError(f"TRL sees {args.world_size} process(es), not num_processes={num_processes}: its generation "
                          f"batch is {args.generation_batch_size} completions instead of {config.batch_size}")
    return args


MAPPING_KINDS = ("same", "converted", "handled by the bridge", "no counterpart")


def mapping_table(config: GRPOConfig, trl_args) -> list[dict]:
    """One row per GRPOConfig field: its kind (MAPPING_KINDS), value, TRL field and value, and how it is
    carried over; ordered by kind, then as in the config."""
    rows = []
    for f in fields(GRPOConfig):
        value = getattr(config, f.name)
        if f.name in SAME:
            row = ("same", f.name, getattr(trl_args, f.name), "")
        elif f.name in CONVERTED:
            trl_name, how = CONVERTED[f.name]
            row = ("converted", trl_name, getattr(trl_args, trl_name), how)
        elif f.name in HANDLED:
            row = ("handled by the bridge", "", "", HANDLED[f.name])
        else:
            row = ("no counterpart", "", "", NO_COUNTERPART[f.name][1])
        kind, trl_name, trl_value, how = row
        rows.append({"kind": kind, "grpo_lib": f.name, "value": value, "TRL": trl_name, "TRL value": trl_value,
                     "how": how})
    return sorted(rows, key=lambda r: MAPPING_KINDS.index(r["kind"]))


def max_processes(config: GRPOConfig, candidates: tuple[int, ...] = (1, 2, 4, 8)) -> int:
    """The most processes (GPUs of one node) among `candidates` that the step's batch splits over evenly."""
    def splits(n: int) -> bool:
        try:
            return per_device_batch_size(config, n) > 0
        except ConfigError:
            return False

    return max(n for n in candidates if splits(n))


def _check_overrides(overrides: dict, mapped: set[str], trl_names: set[str]) -> None:
    unknown = sorted(set(overrides) - trl_names)
    if unknown:
        raise ConfigError(f"{unknown} are not trl.GRPOConfig fields")
    taken = sorted(set(overrides) & (mapped | set(RESERVED)))
    if taken:
        owner = {**{trl_name: name for name, (trl_name, _) in CONVERTED.items()}, **RESERVED}
        owners = sorted({owner.get(t, t) for t in taken})
        raise ConfigError(f"TRL settings {taken} are set from grpo_lib's config; change {owners} in the config file "
                          f"instead of overriding them")


# ----------------------------------------------------------------------------------------------
# TRL -> grpo_lib
# ----------------------------------------------------------------------------------------------


def from_trl_config(trl_cfg, base: GRPOConfig | None = None) -> GRPOConfig:
    """The grpo_lib config whose to_trl_config is `trl_cfg`: the SAME and CONVERTED knobs from trl_cfg, the
    others from `base` (default GRPOConfig()). Refuses TRL settings that change the math away from grpo_lib's."""
    differing = {k: getattr(trl_cfg, k) for k, v in PINNED.items() if getattr(trl_cfg, k) != v}
    if differing:
        raise ConfigError(f"TRL settings {differing} have no grpo_lib counterpart (grpo_lib uses {PINNED})")
    mu = trl_cfg.num_iterations
    scheduler = getattr(trl_cfg.lr_scheduler_type, "value", trl_cfg.lr_scheduler_type)
    changes = {name: getattr(trl_cfg, name) for name in SAME}
    changes.update({
        "prompts_per_step": trl_cfg.generation_batch_size // trl_cfg.num_generations,
        "max_steps": _per_generation(trl_cfg.max_steps, mu, "max_steps"),
        "warmup_steps": _per_generation(int(trl_cfg.warmup_steps), mu, "warmup_steps"),
        "save_steps": _per_generation(trl_cfg.save_steps, mu, "save_steps"),
        "lr_scheduler_type": {"constant_with_warmup": "constant"}.get(scheduler, scheduler),
        "gradient_checkpointing": bool(trl_cfg.activation_checkpointing),
        "reward_weights": None if trl_cfg.reward_weights is None else tuple(trl_cfg.reward_weights),
        "report_to": trl_cfg.report_to,  # TRL's "none" is GRPOConfig's () (config.tracker_names)
    })
    return (base or GRPOConfig()).replace(**changes)


def _per_generation(optimiser_steps: int, mu: int, name: str) -> int:
    if optimiser_steps % mu:
        raise ConfigError(f"TRL {name}={optimiser_steps} is not a whole number of generation batches "
                          f"(num_iterations={mu} optimiser steps each)")
    return optimiser_steps // mu


# ----------------------------------------------------------------------------------------------
# the HANDLED knobs: model, adapter, data
# ----------------------------------------------------------------------------------------------


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def model_init_kwargs(config: GRPOConfig, device: str | None = None) -> dict:
    """from_pretrained keyword arguments: the compute dtype, and nf4 on this process's GPU when load_in_4bit.
    A LoRA run keeps the frozen base in the compute dtype; full fine-tuning loads fp32 (AMP / ZeRO computes
    in bf16 and keeps fp32 master weights)."""
    import torch

    from .models import bnb_4bit_config, compute_dtype, default_device

    device = device or default_device()
    compute = compute_dtype(device, config.dtype)
    kwargs = {"dtype": compute if config.lora_r > 0 else torch.float32}
    if config.load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(compute)
        kwargs["device_map"] = {"": "cpu" if torch.device(device).type == "cpu" else local_rank()}
    return kwargs


def load_model(config: GRPOConfig, device: str | None = None):
    """(base model, tokenizer) for TRL: no adapter yet (TRL adds it from lora_peft_config). Under ZeRO-3 build
    the trl.GRPOConfig first, so that from_pretrained partitions the weights while loading."""
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer, resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model), **model_init_kwargs(config, device))
    return model, load_tokenizer(config.model)


def lora_peft_config(config: GRPOConfig):
    """peft LoraConfig of the config's lora_* knobs; None for full fine-tuning (lora_r = 0)."""
    from .models import lora_config

    if config.lora_r == 0:
        return None
    return lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)


def make_trl_trainer(config: GRPOConfig, model, tokenizer, reward_funcs=None, dataset=None, peft_config=None, *,
                     args=None, output_dir: str = "trl_output", callbacks=None, **trl_overrides):
    """trl.GRPOTrainer for `config`.

    model: a (base) model, e.g. from load_model. reward_funcs: names or callables (default
    config.reward_funcs), passed to TRL unchanged. dataset: rows with "prompt" (default data.task_rows(config));
    prompts over max_prompt_length are skipped or refused as config.long_prompts says. peft_config: default
    the config's LoRA (none when lora_r = 0 or the model already has adapters). args: a prebuilt
    to_trl_config(config, ...) (else built from output_dir and trl_overrides).
    """
    import datasets
    import trl

    from .data import check_dataset, filter_long_prompts, task_rows
    from .models import is_peft
    from .rewards import resolve_reward_funcs

    args = args if args is not None else to_trl_config(config, output_dir, **trl_overrides)
    funcs = resolve_reward_funcs(reward_funcs if reward_funcs is not None else config.reward_funcs)
    rows = check_dataset(dataset if dataset is not None else task_rows(config))
    rows = filter_long_prompts(rows, tokenizer, config.max_prompt_length, config.long_prompts)
    if peft_config is None and not is_peft(model):
        peft_config = lora_peft_config(config)
    return trl.GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)

