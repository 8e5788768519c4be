"""Predicted (grpo_lib.memory) vs measured peak memory of real grpo_lib training steps on CPU.

    python bench/memory_check.py                       # every case, each in a fresh subprocess
    python bench/memory_check.py --cases tiny-g8-t64 smollm2-g4-t48
    python bench/memory_check.py --json out.json

Each case runs in its own process: load the model, build grpo_lib.trainer.GRPOTrainer, note the
resident memory (baseline), reset the kernel's high-water mark (/proc/self/clear_refs), run one
GRPOTrainer.step(), and read the high-water mark (VmHWM) again. measured = peak - baseline, the
memory one step adds to a loaded model; it is compared with MemoryReport.step_bytes (gradients +
AdamW states + the largest phase: activations + logits chunk, or KV cache + sampling buffers).

Completions are forced to full length (EOS is mapped to a token the models never sample), because the
planner predicts the worst case: every completion reaching max_completion_length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

# Tiny random models, built in-process from a LlamaConfig (the embedded tokenizer's vocabulary).
TINY_MODELS = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "tiny-wide": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4),
}
# name -> (model, config overrides of the cpu-tiny preset)
CASES = {
    "tiny-g8-t64": ("tiny", dict(prompts_per_step=4, num_generations=8, max_completion_length=64)),
    "tiny-wide-g4-t128": ("tiny-wide", dict(prompts_per_step=2, num_generations=4, max_completion_length=128)),
    "tiny-wide-g8-t96-ckpt": ("tiny-wide", dict(prompts_per_step=2, num_generations=8, max_completion_length=96,
                                                gradient_checkpointing=True)),
    "smollm2-g4-t48": ("smollm2-135m", dict(prompts_per_step=2, num_generations=4, max_completion_length=48)),
    "smollm2-g8-t32-ga2": ("smollm2-135m", dict(prompts_per_step=2, num_generations=8, max_completion_length=32,
                                                gradient_accumulation_steps=2)),
    "smollm2-g8-t64-ckpt": ("smollm2-135m", dict(prompts_per_step=2, num_generations=8, max_completion_length=64,
                                                 gradient_checkpointing=True, logprob_chunk_size=128)),
}
DEFAULT_CASES = ("tiny-g8-t64", "tiny-wide-g4-t128", "tiny-wide-g8-t96-ckpt", "smollm2-g4-t48")
NEVER_SAMPLED = 49151  # a rare word piece of the SmolLM2 vocabulary, used as the "EOS" of these runs


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    """Reset the process's resident high-water mark (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class RSSSampler(threading.Thread):
    """Samples resident memory every `period` seconds: (time, bytes) pairs, to split a peak by phase."""

    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.samples.append((time.perf_counter(), rss_bytes()))
            time.sleep(self.period)

    def stop(self):
        self._halt.set()
        self.join()

    def peak(self, start: float, end: float) -> int:
        return max((b for t, b in self.samples if start <= t <= end), default=0)


def build_tiny(name: str, folder: str) -> None:
    """Save a random Llama of TINY_MODELS[name] with the embedded tokenizer to `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpo_lib.models import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY_MODELS[name])
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_case(name: str) -> dict:
    """One case in this process (call it in a fresh one): predicted and measured bytes."""
    import gc
    import tempfile

    import torch

    from grpo_lib import data, memory, models
    from grpo_lib.config import GRPOConfig
    from grpo_lib.trainer import GRPOTrainer

    model_name, overrides = CASES[name]
    config = GRPOConfig.preset("cpu-tiny", **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_name
        if model_name in TINY_MODELS:
            path = os.path.join(tmp, model_name)
            build_tiny(model_name, path)
        model, tokenizer = models.load_policy(path, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                              gradient_checkpointing=config.gradient_checkpointing, device="cpu")
    # the planner predicts the worst case, every completion max_completion_length tokens long
    tokenizer.eos_token_id = NEVER_SAMPLED
    model.generation_config.eos_token_id = NEVER_SAMPLED
    with torch.no_grad():  # safetensors weights are memory-mapped: page them in before the baseline
        for p in model.parameters():
            p.sum()
    rows = data.load_task(config.task, "train", n=64, seed=config.seed)
    trainer = GRPOTrainer(model, tokenizer, config=config, train_dataset=rows)
    prompt_tokens = max(len(tokenizer(data.format_prompt(tokenizer, r["prompt"]), add_special_tokens=False)
                            ["input_ids"]) for r in rows)

    gc.collect()
    baseline = rss_bytes()
    sampler = RSSSampler()
    sampler.start()
    reset_hwm()
    t0 = time.perf_counter()
    record = trainer.step()
    t1 = time.perf_counter()
    peak = hwm_bytes()
    sampler.stop()
    m = record.metrics
    t_gen = t0 + m["time/generate_s"]
    t_train = t_gen + m["time/score_s"]

    report = memory.estimate(config, model, device="cpu", prompt_length=prompt_tokens)
    return {
        "case": name, "model": model_name, "prompt_tokens": prompt_tokens,
        "completion_mean_length": m["completion/mean_length"],
        "config": {k: getattr(config, k) for k in ("prompts_per_step", "num_generations", "max_completion_length",
                                                    "gradient_checkpointing", "gradient_accumulation_steps",
                                                    "logprob_chunk_size", "share_prompt_forward")},
        "baseline_bytes": baseline, "peak_bytes": peak, "measured_bytes": peak - baseline,
        "measured_generation_bytes": sampler.peak(t0, t_gen) - baseline,
        "measured_training_bytes": sampler.peak(t_train, t1) - baseline,
        "predicted_bytes": report.step_bytes, "predicted_phases": report.phases,
        "predicted_components": report.components, "step_s": t1 - t0,
        "threads": torch.get_num_threads(), "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def run_in_subprocess(name: str, default_malloc: bool = False, timeout: float = 1800) -> dict:
    """run_case(name) in a fresh Python process (so that its memory is its own).

    Unless default_malloc, glibc's mmap threshold is pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_), so
    freed tensors go back to the OS and resident memory tracks live tensors, as a GPU allocator's
    would. With glibc's default (a threshold that grows to 32 MiB), freed activations stay in the
    heap and the resident peak of the same step is up to ~1.6x higher (see bench/results.md).
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}  # speed only
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name], capture_output=True,
                         text=True, timeout=timeout, env=env)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"case {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def format_table(results: list[dict]) -> str:
    """Predicted vs measured MiB per case: the whole step, and its generation and training phases."""
    mib = 2**20
    lines = [f"{'case':24} {'P':>4} {'predicted':>10} {'measured':>10} {'ratio':>6}   "
             f"{'generation pred/meas':>21} {'training pred/meas':>19}"]
    for r in results:
        p, c = r["predicted_phases"], r["predicted_components"]
        fixed = c["gradients"] + c["optimizer_states"]
        lines.append(
            f"{r['case']:24} {r['prompt_tokens']:>4} {r['predicted_bytes'] / mib:>7.0f}MiB "
            f"{r['measured_bytes'] / mib:>7.0f}MiB {r['predicted_bytes'] / r['measured_bytes']:>6.2f}   "
            f"{(p['generation'] + fixed) / mib:>10.0f}/{r['measured_generation_bytes'] / mib:<6.0f}MiB "
            f"{(p['training'] + fixed) / mib:>8.0f}/{r['measured_training_bytes'] / mib:<6.0f}MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=sorted(CASES))
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default malloc tuning (freed activations stay resident)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(run_case(args.child)), flush=True)
        return 0
    results = []
    for name in args.cases:
        results.append(run_in_subprocess(name, args.default_malloc))
        print(format_table(results[-1:]).splitlines()[-1] if results[1:] else format_table(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
