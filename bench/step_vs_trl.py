"""One GRPO configuration through grpo_lib and through TRL's GRPOTrainer, alternating A B A B.

    python bench/step_vs_trl.py                              # 2 rounds x (1 warm-up + 2 measured steps)
    python bench/step_vs_trl.py --rounds 3 --steps 3 --json bench/last_run.json
    python bench/step_vs_trl.py --gradient-checkpointing     # the same setting goes to both sides
    python bench/step_vs_trl.py --colab-t4-path              # nf4 + fp16 + checkpointing on both sides

The configuration (both sides): the embedded SmolLM2-135M-Instruct in fp32 on CPU, LoRA r=16 (alpha 32)
on all linear layers, 4 prompts x G=8 completions per step, max_completion_length=64, the one-shot
`larger` prompts (81 tokens with the chat template), beta=0.04, loss_type="grpo", mu=1, lr 2e-4,
temperature 1, top_p 1, no top-k, rewards "format" + "answer".

Each side runs in its own subprocess (so peak resident memory is per side): load, warm-up step(s),
then `--steps` timed steps. A side reports wall time per step, generated tokens per second of its
sampling phase (tokens counted up to and including the first EOS), and its peak resident memory
(ru_maxrss, loading included). The grpo_lib side also times plain `model.generate` on each measured
step's prompts (the same 32 rows, the same sampling settings, no shared prompt prefill): the
reference for the generation goal. Medians over all measured steps of all rounds; ratios grpo_lib/TRL. Each
grpo_lib phase (generation, training) is also set against its floor (bench/floors.py: the step's matmul FLOPs
over this machine's matmul throughput at the step's own shapes, measured in the same process).

--colab-t4-path runs the code path of the colab-t4 preset on this CPU, on both sides: the base in bitsandbytes
nf4 (double quantisation, fp16 compute), LoRA, gradient checkpointing, and every fp16 matrix product computed as
a GPU's tensor cores compute it (tests/fp16_matmuls.py: fp32 products rounded to fp16; a CPU's own fp16 GEMM is
~60x slower). grpo_lib loads it as its colab-t4 preset does (load_policy: peft's kbit preparation, fp32 head
multiplied from an fp16 copy, fp16 loss scaling); TRL gets the same nf4 fp16 model as a Colab user would hand it
(TRL casts the adapters of a quantised model to bf16) with activation_checkpointing on, and no fp16 autocast or
loss scaling (accelerate has none on a CPU). The floors stay fp32 matmul floors: under the simulation an fp16
product costs an fp32 one plus its rounding, and nf4 dequantisation is not in them.

Goals, printed as met or missed: step time <= 0.33 x TRL's, peak memory <= 0.25 x TRL's, generation >= 4 x
plain model.generate tokens/s, generation <= 1.2 x its floor, training <= 2 x its floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS, G, LORA_R, LORA_ALPHA, LR, BETA, SEED = 4, 8, 16, 32, 2e-4, 0.04, 0
MiB = 2**20
FLOOR_GOALS = {"generation": 1.2, "training": 2.0}  # measured / floor, at most
COLAB_T4_PATH = dict(load_in_4bit=True, dtype="float16")  # the colab-t4 preset's path (with checkpointing)
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def simulate_fp16_matmuls() -> None:
    """From here on, in this process, fp16 matrix products run as on a GPU (tests/fp16_matmuls.py)."""
    sys.path.insert(0, TESTS)
    from fp16_matmuls import Fp16MatmulsInFloat32

    Fp16MatmulsInFloat32().__enter__()  # entered for the life of the child process


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def completion_tokens(completion_ids, eos_ids) -> tuple[int, int]:
    """(tokens up to and including each row's first EOS, decoding steps) of completions [B, T]."""
    from grpo_lib.sampling import completion_mask_from_eos

    mask, _ = completion_mask_from_eos(completion_ids, eos_ids)
    return int(mask.sum()), completion_ids.size(1)


# ----------------------------------------------------------------------------------------------
# side A: grpo_lib
# ----------------------------------------------------------------------------------------------


def run_grpo_lib(args) -> dict:
    import torch

    from grpo_lib import data, models
    from grpo_lib.cli import parse_overrides
    from grpo_lib.config import GRPOConfig
    from grpo_lib.sampling import eos_token_ids, generate_completions, tokenize_prompts
    from grpo_lib.trainer import GRPOTrainer

    config = GRPOConfig.preset(
        "cpu-tiny", prompts_per_step=PROMPTS, num_generations=G, max_completion_length=args.max_completion_length,
        gradient_checkpointing=args.gradient_checkpointing, lora_r=LORA_R, lora_alpha=LORA_ALPHA, learning_rate=LR,
        beta=BETA, loss_type="grpo", num_iterations=1, seed=SEED, max_steps=args.warmup + args.steps,
        **(COLAB_T4_PATH if args.colab_t4_path else {}), **parse_overrides(args.grpo_lib_set))
    t0 = time.perf_counter()
    model, tokenizer = models.load_policy_from_config(config, device="cpu")
    rows = data.load_task(config.task, "train", seed=config.seed, one_shot=True)
    trainer = GRPOTrainer(model, tokenizer, config=config, train_dataset=rows)
    load_s, loaded_rss = time.perf_counter() - t0, rss_bytes()
    eos = eos_token_ids(model, tokenizer)

    from floors import floors

    from grpo_lib.model_specs import model_spec

    spec = model_spec(config.model)
    steps, plain = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        record = trainer.step()
        step_s = time.perf_counter() - t
        m = record.metrics
        measured = i >= args.warmup
        prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in record.prompts]
        steps.append({"measured": measured, "step_s": step_s, "generate_s": m["time/generate_s"],
                      "train_s": m["time/train_s"], "tokens": m["tokens/generated"],
                      "decode_steps": max(record.lengths), "loss": m.get("loss"),
                      **(floors(spec, config, prompt_tokens, record.lengths) if measured else {})})
        if measured and args.plain_generate:
            # plain model.generate on the same 32 rows: every row prefills its own prompt
            ids, mask = tokenize_prompts(tokenizer, record.prompts, "cpu")
            t = time.perf_counter()
            completion_ids, *_ = generate_completions(
                model, tokenizer, ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0),
                config.max_completion_length, do_sample=True, temperature=config.temperature, top_p=config.top_p,
                top_k=None)
            gen_s = time.perf_counter() - t
            tokens, decode_steps = completion_tokens(completion_ids, eos)
            plain.append({"generate_s": gen_s, "tokens": tokens, "decode_steps": decode_steps})
        print(f"  grpo_lib step {i}{'' if measured else ' (warm-up)'}: {step_s:.1f}s "
              f"(generate {m['time/generate_s']:.1f}s, train {m['time/train_s']:.1f}s, "
              f"{m['tokens/generated']} tokens)" + (f"; plain generate {plain[-1]['generate_s']:.1f}s "
                                                   f"{plain[-1]['tokens']} tokens" if measured and plain else ""),
              file=sys.stderr, flush=True)
    return {"side": "grpo_lib", "steps": steps, "plain_generate": plain, "load_s": load_s,
            "loaded_rss_bytes": loaded_rss, "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# side B: TRL
# ----------------------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback

    from grpo_lib import data, models
    from grpo_lib.rewards import resolve_reward_funcs

    t0 = time.perf_counter()
    if args.colab_t4_path:  # the nf4 fp16 model a Colab user hands TRL (no peft kbit preparation: TRL does not)
        model = AutoModelForCausalLM.from_pretrained(
            models.embedded_model_path(), dtype=torch.float16, device_map={"": "cpu"},
            quantization_config=models.bnb_4bit_config(torch.float16))
        models.keep_4bit_weights_trainable_on_cpu(model)  # bitsandbytes' CPU repacking, as on the grpo_lib side
    else:
        model = AutoModelForCausalLM.from_pretrained(models.embedded_model_path(), dtype=torch.float32)
    tokenizer = models.load_tokenizer("smollm2-135m")
    rows = data.load_task("larger", "train", seed=SEED, one_shot=True)
    out_dir = tempfile.mkdtemp(prefix="trl_bench_")
    trl_args = trl.GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1,
        save_strategy="no", seed=SEED, max_steps=args.warmup + args.steps, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
        per_device_train_batch_size=PROMPTS * G, num_generations=G, steps_per_generation=1,
        gradient_accumulation_steps=1, max_completion_length=args.max_completion_length, temperature=1.0,
        top_p=1.0, top_k=0, beta=BETA, loss_type="grpo", num_iterations=1, epsilon=0.2, scale_rewards="group",
        activation_checkpointing=args.gradient_checkpointing, remove_unused_columns=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=resolve_reward_funcs(("format", "answer")), args=trl_args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=models.lora_config(LORA_R, LORA_ALPHA))
    load_s, loaded_rss = time.perf_counter() - t0, rss_bytes()

    # time TRL's sampling: it calls generate() on the unwrapped (peft) model, this very object
    peft_model = trainer.model
    gen_log = []
    original_generate = peft_model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = original_generate(*a, **kw)
        prompt_len = kw["input_ids"].size(1) if "input_ids" in kw else a[0].size(1)
        tokens, decode_steps = completion_tokens(out[:, prompt_len:], trainer.eos_token_ids)
        gen_log.append({"generate_s": time.perf_counter() - t, "tokens": tokens, "decode_steps": decode_steps})
        return out

    peft_model.generate = timed_generate
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()
            self.n_gen = len(gen_log)

        def on_step_end(self, a, state, control, **kw):
            i = len(steps)
            gens = gen_log[self.n_gen:]
            step = {"measured": i >= args.warmup, "step_s": time.perf_counter() - self.t,
                    "generate_s": sum(g["generate_s"] for g in gens), "tokens": sum(g["tokens"] for g in gens),
                    "decode_steps": max((g["decode_steps"] for g in gens), default=0)}
            step["train_s"] = step["step_s"] - step["generate_s"]
            steps.append(step)
            print(f"  TRL step {i}{'' if step['measured'] else ' (warm-up)'}: {step['step_s']:.1f}s "
                  f"(generate {step['generate_s']:.1f}s, {step['tokens']} tokens)", file=sys.stderr, flush=True)

    trainer.add_callback(StepTimer())
    trainer.train()
    return {"side": "trl", "steps": steps, "load_s": load_s, "loaded_rss_bytes": loaded_rss,
            "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads(), "trl_version": trl.__version__}


# ----------------------------------------------------------------------------------------------
# the parent: alternate the sides, summarise
# ----------------------------------------------------------------------------------------------


def run_side(side: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--max-completion-length", str(args.max_completion_length)]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--colab-t4-path"] if args.colab_t4_path else []
    cmd += [] if args.plain_generate else ["--no-plain-generate"]
    cmd += [x for pair in args.grpo_lib_set for x in ("--grpo-lib-set", pair)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.malloc_mmap_threshold:  # glibc: allocations above this are mmapped and returned to the OS on free
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    t = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed (exit {out.returncode}):\n{(out.stderr or '')[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    return result


def summarise(runs: list[dict]) -> dict:
    def measured(side):
        return [s for r in runs if r["side"] == side for s in r["steps"] if s["measured"]]

    out = {}
    for side in ("grpo_lib", "trl"):
        steps = measured(side)
        if not steps:
            continue
        if side == "grpo_lib":  # each phase against its floor (floors.py), per step, then the median
            out["floors"] = {
                phase: {"median_floor_s": statistics.median(s[f"{phase}_floor_s"] for s in steps),
                        "median_ratio": statistics.median(s[f"{key}_s"] / s[f"{phase}_floor_s"] for s in steps),
                        "gflop": statistics.median(s[f"{phase}_gflop"] for s in steps),
                        "gflops_per_s": statistics.median(s[f"{phase}_gflops_per_s"] for s in steps)}
                for phase, key in (("generation", "generate"), ("training", "train"))}
        out[side] = {
            "step_s": [round(s["step_s"], 2) for s in steps],
            "median_step_s": statistics.median(s["step_s"] for s in steps),
            "median_generate_s": statistics.median(s["generate_s"] for s in steps),
            "median_train_s": statistics.median(s["train_s"] for s in steps),
            "generate_tokens_per_s": sum(s["tokens"] for s in steps) / sum(s["generate_s"] for s in steps),
            "generate_s_per_decode_step": statistics.median(s["generate_s"] / max(s["decode_steps"], 1) for s in steps),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs if r["side"] == side),
            "loaded_rss_bytes": max(r["loaded_rss_bytes"] for r in runs if r["side"] == side),
        }
    plain = [p for r in runs if r["side"] == "grpo_lib" for p in r.get("plain_generate", [])]
    if plain:
        out["plain_generate"] = {
            "generate_tokens_per_s": sum(p["tokens"] for p in plain) / sum(p["generate_s"] for p in plain),
            "median_generate_s": statistics.median(p["generate_s"] for p in plain),
            "generate_s_per_decode_step": statistics.median(p["generate_s"] / max(p["decode_steps"], 1)
                                                            for p in plain)}
    if "grpo_lib" in out and "trl" in out:
        a, b = out["grpo_lib"], out["trl"]
        out["ratios"] = {"step_time": a["median_step_s"] / b["median_step_s"],
                         "peak_rss": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                         "generate_tokens_per_s": a["generate_tokens_per_s"] / b["generate_tokens_per_s"]}
    if "grpo_lib" in out and plain:
        out.setdefault("ratios", {})["generate_vs_plain_tokens_per_s"] = (
            out["grpo_lib"]["generate_tokens_per_s"] / out["plain_generate"]["generate_tokens_per_s"])
        out["ratios"]["generate_vs_plain_per_decode_step"] = (
            out["plain_generate"]["generate_s_per_decode_step"] / out["grpo_lib"]["generate_s_per_decode_step"])
    return out


def format_summary(s: dict) -> str:
    lines = [f"{'':10} {'median step':>12} {'generate':>9} {'train':>8} {'gen tok/s':>10} {'s/decode step':>14} "
             f"{'peak RSS':>10} {'loaded RSS':>11}"]
    for side in ("grpo_lib", "trl"):
        if side in s:
            x = s[side]
            lines.append(f"{side:10} {x['median_step_s']:>11.1f}s {x['median_generate_s']:>8.1f}s "
                         f"{x['median_train_s']:>7.1f}s {x['generate_tokens_per_s']:>10.1f} "
                         f"{x['generate_s_per_decode_step']:>14.3f} {x['peak_rss_bytes'] / MiB:>8.0f}MiB "
                         f"{x['loaded_rss_bytes'] / MiB:>9.0f}MiB")
    if "plain_generate" in s:
        p = s["plain_generate"]
        lines.append(f"{'generate()':10} {'':>12} {p['median_generate_s']:>8.1f}s {'':>8} "
                     f"{p['generate_tokens_per_s']:>10.1f} {p['generate_s_per_decode_step']:>14.3f}")
    for side in ("grpo_lib", "trl"):
        if side in s:
            lines.append(f"{side} step times: {s[side]['step_s']}")
    for phase, f in s.get("floors", {}).items():
        goal = FLOOR_GOALS[phase]
        ok = f["median_ratio"] <= goal
        lines.append(f"grpo_lib {phase}: {f['gflop']:.0f} GFLOP at {f['gflops_per_s']:.0f} GFLOP/s (this machine's matmuls "
                     f"at the phase's shapes) = floor {f['median_floor_s']:.1f}s; measured/floor {f['median_ratio']:.2f} "
                     f"(goal <= {goal}: {'met' if ok else 'MISSED'})")
    if "ratios" in s:
        r = s["ratios"]
        goals = {"step_time": ("<=", 0.33), "peak_rss": ("<=", 0.25), "generate_vs_plain_tokens_per_s": (">=", 4.0)}
        for k, v in r.items():
            goal = goals.get(k)
            verdict = ""
            if goal:
                ok = v <= goal[1] if goal[0] == "<=" else v >= goal[1]
                verdict = f"  (goal {goal[0]} {goal[1]}: {'met' if ok else 'MISSED'})"
            lines.append(f"ratio {k}: {v:.3f}{verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (each side once per round)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per subprocess")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps per subprocess (not measured)")
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (default off)")
    ap.add_argument("--colab-t4-path", action="store_true",
                    help="both sides on the colab-t4 code path: nf4, fp16 (simulated GPU matmuls), checkpointing")
    ap.add_argument("--no-plain-generate", dest="plain_generate", action="store_false",
                    help="skip the plain model.generate reference on the grpo_lib side")
    ap.add_argument("--sides", nargs="+", default=["grpo_lib", "trl"], choices=["grpo_lib", "trl"],
                    help="order within a round")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of both sides (default PASSIVE: on a busy machine, spinning OpenMP "
                         "threads make 2-thread torch several times slower; '' keeps the environment's)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both sides (default: torch's choice)")
    ap.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                    help="MALLOC_MMAP_THRESHOLD_ of both sides (e.g. 65536: freed activations leave the resident "
                         "set instead of staying in glibc's heap; default: glibc's own dynamic threshold)")
    ap.add_argument("--grpo-lib-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a grpo_lib config field (experiments only: the comparison is then not like "
                         "for like unless the change keeps the math, e.g. gradient_accumulation_steps)")
    ap.add_argument("--json", help="write every step and the summary to this file")
    ap.add_argument("--verbose", action="store_true", help="show the children's stderr as they run")
    ap.add_argument("--child", choices=["grpo_lib", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.gradient_checkpointing |= args.colab_t4_path  # the colab-t4 preset checkpoints

    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        if args.colab_t4_path:
            simulate_fp16_matmuls()
        result = run_grpo_lib(args) if args.child == "grpo_lib" else run_trl(args)
        print(json.dumps(result), flush=True)
        return 0

    print(f"{platform.node()}: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or os.environ.get('OMP_WAIT_POLICY')}, "
          f"threads={args.threads or 'default'}, MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'default'}; "
          f"{args.rounds} rounds x {args.sides}, {args.warmup} warm-up + {args.steps} measured steps each, "
          f"T={args.max_completion_length}, checkpointing {'on' if args.gradient_checkpointing else 'off'}"
          + (", the colab-t4 code path (nf4, fp16 simulated, checkpointing)" if args.colab_t4_path else "")
          + (f", grpo_lib overrides {args.grpo_lib_set}" if args.grpo_lib_set else ""),
          flush=True)
    runs = []
    for rnd in range(args.rounds):
        for side in args.sides:
            result = run_side(side, args)
            runs.append(result)
            times = ", ".join(f"{s['step_s']:.1f}" for s in result["steps"])
            print(f"round {rnd + 1} {side:8}: steps [{times}] s, peak RSS {result['peak_rss_bytes'] / MiB:.0f} MiB, "
                  f"load {result['load_s']:.1f}s, load average {os.getloadavg()[0]:.1f}", flush=True)
    summary = summarise(runs)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "runs": runs, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
