"""The command line: a run killed with SIGKILL after its first checkpoint resumes to the end, with
every step logged once, the same rewards as an uninterrupted run, and an adapter peft can load."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_lib import runlog

SMALL = ["--preset", "cpu-tiny", "--steps", "3", "--save-steps", "1", "--set", "num_generations=2",
         "--set", "prompts_per_step=2", "--set", "max_completion_length=8", "--set", "num_eval_prompts=0"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "grpo_lib", "train", *args], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = cli(*SMALL, "--run-dir", str(full))
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "grpo_lib", "train", *SMALL, "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000001").exists():
        assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()  # it really died before the end

    resumed = cli(*SMALL, "--run-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = runlog.load_run_log(killed)
    assert [r.step for r in records] == [1, 2, 3]
    expected = {r.step: r.total for r in runlog.load_run_log(full)}
    for r in records:
        assert r.total == pytest.approx(expected[r.step], abs=1e-5), r.step

    from peft import PeftModel

    from grpo_lib.models import load_policy

    base, _ = load_policy("smollm2-135m", lora_r=0)
    model = PeftModel.from_pretrained(base, killed / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_bad_config_is_refused_with_the_field_name(tmp_path):
    out = cli("--preset", "cpu-tiny", "--set", "num_generations=1", "--run-dir", str(tmp_path))
    assert out.returncode == 2
    assert "num_generations=1 is invalid" in out.stderr
    assert not any(Path(tmp_path).iterdir())  # nothing written


def test_user_errors_end_in_one_line(tmp_path, monkeypatch, capsys):
    """A model the planner does not know, on a GPU, is sized from its config.json like in the notebooks; when
    that cannot be read either (no such model, no network), the user gets one line, not a traceback."""
    import torch

    from grpo_lib import cli

    from grpo_lib import memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the planner runs only on a GPU: a T4
    monkeypatch.setattr(memory, "default_device_bytes", lambda device="cuda": memory.T4_REPORTED_BYTES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["train", "--preset", "cpu-tiny", "--set", "model=nobody/no-such-model", "--run-dir",
                     str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: no architecture known for model 'nobody/no-such-model'")
    assert not (tmp_path / "run").exists()


def test_a_local_model_folder_is_planned_from_its_config(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from grpo_lib import memory
    from grpo_lib.config import GRPOConfig

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    spec = memory.model_spec(str(tmp_path))
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_kv_heads) == (1000, 64, 2, 2)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "default_device_bytes", lambda device="cuda": memory.T4_REPORTED_BYTES)
    report = memory.plan_or_refuse(GRPOConfig(model=str(tmp_path)))
    assert report is not None and report.fits
    with pytest.raises(memory.MemoryPlanError, match="would not fit on this GPU. Cheaper settings"):
        memory.plan_or_refuse(GRPOConfig(model="Qwen/Qwen2.5-7B-Instruct", load_in_4bit=False, lora_r=16))
