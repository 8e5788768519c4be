"""grpo_lib.trl_bridge: the config mapping to trl.GRPOConfig, the config files, and a 2-step TRL run on CPU."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from grpo_lib import trl_bridge
from grpo_lib.data import task_rows
from grpo_lib.config import LOSS_TYPES, ConfigError, GRPOConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# a valid non-default value for every knob TRL carries (SAME and CONVERTED)
NON_DEFAULT = {
    "num_generations": 4, "max_completion_length": 64, "temperature": 0.7, "top_p": 0.9, "learning_rate": 3e-6,
    "weight_decay": 0.1, "max_grad_norm": 0.5, "gradient_accumulation_steps": 4, "num_iterations": 3, "beta": 0.0,
    "epsilon": 0.1, "epsilon_high": 0.28, "loss_type": "dapo", "scale_rewards": "batch", "seed": 7,
    "save_total_limit": 5, "prompts_per_step": 3, "max_steps": 17, "warmup_steps": 5, "save_steps": 0,
    "lr_scheduler_type": "cosine", "gradient_checkpointing": False, "reward_weights": (0.5, 2.0),
    "report_to": ("tensorboard",), "importance_sampling_level": "sequence", "mask_truncated_completions": True,
    "top_entropy_quantile": 0.2,
}


def test_every_field_is_in_exactly_one_table():
    trl_bridge.check_tables()
    tables = [set(trl_bridge.SAME), set(trl_bridge.CONVERTED), set(trl_bridge.HANDLED),
              set(trl_bridge.NO_COUNTERPART)]
    names = [f.name for f in fields(GRPOConfig)]
    assert sorted(names) == sorted(n for t in tables for n in t)


def test_a_field_missing_from_the_tables_is_an_error(monkeypatch):
    monkeypatch.setattr(trl_bridge, "SAME", tuple(n for n in trl_bridge.SAME if n != "beta"))
    with pytest.raises(ConfigError, match="beta"):
        trl_bridge.to_trl_config(GRPOConfig())


def test_non_default_values_cover_every_mapped_field():
    assert set(NON_DEFAULT) == set(trl_bridge.SAME) | set(trl_bridge.CONVERTED)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_each_mapped_field_round_trips(name, tmp_path):
    config = GRPOConfig(**{name: NON_DEFAULT[name]})
    base = config.replace(**{name: getattr(GRPOConfig(), name)})  # differs only in `name`: it must come via TRL
    back = trl_bridge.from_trl_config(trl_bridge.to_trl_config(config, tmp_path), base)
    assert getattr(back, name) == NON_DEFAULT[name]
    assert back == config


def test_all_fields_changed_together_round_trip(tmp_path):
    config = GRPOConfig(**NON_DEFAULT, model="smollm2-135m", lora_r=4, task="addition", num_eval_prompts=8)
    back = trl_bridge.from_trl_config(trl_bridge.to_trl_config(config, tmp_path), GRPOConfig(
        model="smollm2-135m", lora_r=4, task="addition", num_eval_prompts=8))
    assert back == config


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_every_loss_type_and_reward_scale_round_trips(loss_type, scale_rewards, tmp_path):
    cap = {"epsilon_high": 5.0} if loss_type == "cispo" else {}  # CISPO's weight cap (epsilon_max)
    config = GRPOConfig(loss_type=loss_type, scale_rewards=scale_rewards, **cap)
    assert trl_bridge.from_trl_config(trl_bridge.to_trl_config(config, tmp_path)) == config


@pytest.mark.parametrize("variant", [
    dict(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),  # GSPO
    dict(loss_type="cispo", epsilon_high=5.0),  # CISPO
    dict(loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True, beta=0.0),  # DAPO
    dict(top_entropy_quantile=0.2),  # 80/20
], ids=["gspo", "cispo", "dapo", "top-entropy"])
def test_objective_variants_reach_trl_under_its_names(variant, tmp_path):
    t = trl_bridge.to_trl_config(GRPOConfig(**variant), tmp_path)
    for name, value in variant.items():
        assert getattr(t, name) == value, name
    assert trl_bridge.from_trl_config(t) == GRPOConfig(**variant)


def test_converted_values(tmp_path):
    c = GRPOConfig(prompts_per_step=4, num_generations=8, gradient_accumulation_steps=2, num_iterations=2,
                   max_steps=10, warmup_steps=3, save_steps=5, lr_scheduler_type="constant", epsilon_high=0.28)
    t = trl_bridge.to_trl_config(c, tmp_path)
    assert t.per_device_train_batch_size == 16  # 4 * 8 completions / (1 process * 2 micro-batches)
    assert t.generation_batch_size == 32 and t.steps_per_generation == 2  # one generation batch = one grpo_lib step
    assert (t.max_steps, t.warmup_steps, t.save_steps) == (20, 6, 10)  # optimiser updates: x num_iterations
    assert t.lr_scheduler_type == "constant_with_warmup"
    assert t.epsilon_high == 0.28 and t.use_bias_correction_kl is False and t.activation_checkpointing is True
    assert t.report_to == [] and t.logging_steps == 1  # report_to="none", every update logged
    assert t.use_cpu is (not torch.cuda.is_available())


def test_batch_is_split_over_processes_and_micro_batches():
    c = GRPOConfig(prompts_per_step=16, num_generations=16, gradient_accumulation_steps=4)
    assert trl_bridge.per_device_batch_size(c, 8) == 8  # 256 / (8 * 4)
    with pytest.raises(ConfigError, match="processes|process"):
        trl_bridge.per_device_batch_size(c, 7)


def test_knob_trl_cannot_express_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reward_timeout_s"):
        trl_bridge.to_trl_config(GRPOConfig(reward_timeout_s=5.0), tmp_path)
    # workbench-only knobs that do not change training are accepted
    trl_bridge.to_trl_config(GRPOConfig(logprob_chunk_size=128, share_prompt_forward=False, num_eval_prompts=4),
                             tmp_path)


def test_overrides_may_not_set_grpo_lib_knobs(tmp_path):
    with pytest.raises(ConfigError, match="beta"):
        trl_bridge.to_trl_config(GRPOConfig(), tmp_path, beta=0.1)
    with pytest.raises(ConfigError, match="prompts_per_step"):
        trl_bridge.to_trl_config(GRPOConfig(), tmp_path, per_device_train_batch_size=2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        trl_bridge.to_trl_config(GRPOConfig(), tmp_path, steps_per_generation=2)
    with pytest.raises(ConfigError, match="not trl.GRPOConfig fields"):
        trl_bridge.to_trl_config(GRPOConfig(), tmp_path, no_such_setting=1)


def test_trl_only_override_is_applied_and_not_mapped_back(tmp_path):
    t = trl_bridge.to_trl_config(GRPOConfig(), tmp_path, entropy_coef=0.01, logging_steps=5)
    assert t.entropy_coef == 0.01 and t.logging_steps == 5
    with pytest.raises(ConfigError, match="entropy_coef"):
        trl_bridge.from_trl_config(t)
    with pytest.raises(ConfigError, match="mask_truncated_completions"):  # a grpo_lib knob now: set it in the config
        trl_bridge.to_trl_config(GRPOConfig(), tmp_path, mask_truncated_completions=True)


def test_model_init_kwargs_and_peft_config():
    kwargs = trl_bridge.model_init_kwargs(GRPOConfig(load_in_4bit=False, lora_r=8), device="cpu")
    assert kwargs == {"dtype": torch.float32}
    q = trl_bridge.model_init_kwargs(GRPOConfig(load_in_4bit=True), device="cpu")
    assert q["quantization_config"].bnb_4bit_quant_type == "nf4" and q["device_map"] == {"": "cpu"}
    assert trl_bridge.model_init_kwargs(GRPOConfig(lora_r=0, load_in_4bit=False), device="cpu")["dtype"] == torch.float32
    lora = trl_bridge.lora_peft_config(GRPOConfig(lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj"))
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj", "v_proj"})
    assert trl_bridge.lora_peft_config(GRPOConfig(lora_r=0, load_in_4bit=False)) is None


# ----------------------------------------------------------------------------------------------
# config files: one format for both trainers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_is_read_alike_by_both_trainers(path, tmp_path):
    from grpo_lib.cli import build_config, make_parser

    config = GRPOConfig.from_yaml(str(path))
    cli_args = make_parser().parse_args(["train", "--config", str(path), "--run-dir", str(tmp_path)])
    assert build_config(cli_args) == config
    script = _load_script()
    assert script.make_parser().parse_args(["--config", str(path)]).config == str(path)
    assert trl_bridge.to_trl_config(config, tmp_path, num_processes=1).generation_batch_size == config.batch_size


@pytest.mark.parametrize("preset", ["cpu-tiny", "colab-t4"])
def test_preset_files_match_the_presets(preset):
    path = ROOT / "configs" / f"{preset}.yaml"
    assert GRPOConfig.from_yaml(str(path)) == GRPOConfig.preset(preset), (
        f"{path} drifted from the preset; rewrite it with GRPOConfig.preset({preset!r}).to_yaml(path) "
        f"(keeping its header comment)")


def test_multi_gpu_example_splits_over_eight_gpus():
    config = GRPOConfig.from_yaml(str(ROOT / "configs" / "multi-gpu.yaml"))
    assert trl_bridge.per_device_batch_size(config, 8) == 8
    trl_bridge.check_expressible(config)


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_configs(stage):
    d = yaml.safe_load((ROOT / "configs" / "accelerate" / f"zero{stage}.yaml").read_text())
    assert d["distributed_type"] == "DEEPSPEED" and d["deepspeed_config"]["zero_stage"] == stage
    assert d["mixed_precision"] == "bf16" and d["deepspeed_config"]["zero3_init_flag"] is (stage == 3)


def test_scale_out_doc_names_every_field():
    doc = (ROOT / "docs" / "scale_out.md").read_text()
    missing = [f.name for f in fields(GRPOConfig) if f"`{f.name}`" not in doc]
    assert not missing, f"docs/scale_out.md does not mention {missing}"
    for path in ("configs/accelerate/zero2.yaml", "configs/accelerate/zero3.yaml", "vllm_mode=server"):
        assert path in doc


def test_script_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: cpu-tiny\nreward_timeout_s: 5.0\n")
    assert _load_script().main(["--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "reward_timeout_s" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the TRL path on CPU: 2 steps of scripts/train_trl.py with the embedded model and the workbench's rewards
# ----------------------------------------------------------------------------------------------

TINY = dict(prompts_per_step=2, num_generations=2, max_completion_length=20, max_steps=2, save_steps=0, lora_r=8,
            lora_alpha=16)


def _load_script():
    spec = importlib.util.spec_from_file_location("train_trl", ROOT / "scripts" / "train_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """(config, trainer, output_dir) of a 2-step run of scripts/train_trl.py on configs/cpu-tiny.yaml."""
    out = tmp_path_factory.mktemp("trl_run")
    argv = ["--config", str(ROOT / "configs" / "cpu-tiny.yaml"), "--output-dir", str(out),
            "--trl", "log_completions=true"]
    for k, v in TINY.items():
        argv += ["--set", f"{k}={v}"]
    # OpenMP threads spin-wait: on a busy 2-core machine one thread runs this ~5x faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = _load_script().run(argv)
    finally:
        torch.set_num_threads(threads)
    return GRPOConfig.preset("cpu-tiny", **TINY), trainer, out


@pytest.mark.slow
def test_trl_run_logs_the_workbench_reward_names(trl_run):
    from grpo_lib.rewards import resolve_reward_funcs, reward_name

    config, trainer, out = trl_run
    names = [reward_name(f) for f in resolve_reward_funcs(config.reward_funcs)]
    assert trainer.reward_func_names == names == ["format", "answer"]
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and trainer.state.global_step == 2
    for h in steps:
        for name in names:
            assert f"rewards/{name}/mean" in h
    assert (out / "adapter_model.safetensors").exists()  # save_model wrote the LoRA adapter
    assert (out / "checkpoint-2").is_dir()  # save_steps=0: a checkpoint at the last step only


@pytest.mark.slow
def test_trl_rewards_equal_the_workbench_rewards(trl_run):
    """TRL's per-completion rewards (its completions log) and logged means equal score_completions on the
    same completions."""
    import pandas as pd

    from grpo_lib.rewards import score_completions

    config, trainer, out = trl_run
    answers = {r["question"]: r["answer"] for r in task_rows(config)}
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    for step in (1, 2):
        table = pd.read_parquet(out / "completions" / f"completions_{step:05d}.parquet")
        assert len(table) == config.batch_size
        prompts = [_messages(p) for p in table["prompt"]]
        completions = [_messages(c) for c in table["completion"]]
        answer = [answers[p[-1]["content"]] for p in prompts]
        scores = score_completions(config.reward_funcs, prompts, completions, {"answer": answer})
        for f, name in enumerate(scores.names):
            ours = scores.per_func[:, f].tolist()
            assert _same(ours, table[name].tolist()), (name, ours, table[name].tolist())
            assert _same([_nanmean(ours)], [logged[step][f"rewards/{name}/mean"]])


@pytest.mark.slow
def test_trl_reward_path_equals_the_workbench_on_chosen_completions(trl_run):
    """Completions chosen to score 1, 0 and None, through TRL's own reward call (columns passed as kwargs,
    conversational completions as message lists), equal score_completions on them."""
    from grpo_lib.rewards import score_completions

    config, trainer, _ = trl_run
    rows = task_rows(config, n=4)
    rows[3] = {**rows[3], "answer": None}  # no gold answer: the answer reward does not apply
    texts = [f"<answer>{rows[0]['answer']}</answer>", "<answer>-1</answer>", "no tags at all",
             f"<think>x</think> <answer>{rows[0]['answer']}</answer>"]
    prompts = [r["prompt"] for r in rows]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    theirs = trainer._calculate_rewards(rows, prompts, completions, [[0]] * len(rows))  # [N, F]
    ours = score_completions(config.reward_funcs, prompts, completions, {"answer": [r["answer"] for r in rows]})
    assert ours.per_func.tolist()[:3] == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]] and math.isnan(ours.per_func[3, 1])
    assert all(_same(ours.per_func[:, f].tolist(), theirs[:, f].tolist()) for f in range(len(ours.names)))


def _messages(x) -> list[dict]:
    return [dict(m) for m in x]  # parquet gives an array of dicts


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-6 for x, y in zip(a, b))


@pytest.mark.slow
def test_two_processes_share_one_generation_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo): N = 2 prompts x 2 completions is split 2 per process, and the
    generation batch TRL logs is still N, each prompt's group whole."""
    import os
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "train_trl.py"), "--config", str(ROOT / "configs" / "cpu-tiny.yaml"),
           "--output-dir", str(out), "--steps", "1", "--set", "prompts_per_step=2", "--set", "num_generations=2",
           "--set", "max_completion_length=8", "--trl", "log_completions=true", "--trl", "num_completions_to_print=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    table = pd.read_parquet(out / "completions" / "completions_00001.parquet")
    questions = [p[-1]["content"] for p in table["prompt"]]
    assert len(questions) == 4 and len(set(questions)) == 2
    assert all(questions.count(q) == 2 for q in questions)
    assert {"format", "answer"} <= set(table.columns)
