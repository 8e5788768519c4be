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
    assert err.startswith("config error: no architecture known for model 'nobody/no-such-model'")
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_on_the_cpu_is_one_line(tmp_path, monkeypatch, capsys):
    """Without a GPU there is no plan; loading the model is what fails, and that is the config's model too."""
    from grpo_lib import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["train", "--preset", "cpu-tiny", "--set", "model=nobody/no-such-model", "--run-dir",
                     str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("config error: model='nobody/no-such-model' cannot be loaded:")


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    from grpo_lib import cli

    missing = tmp_path / "nope.yaml"
    assert cli.main(["plan", "--config", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"config error: config file {missing}: cannot be read (No such file " \
                                               f"or directory)"
    assert cli.main(["doctor", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"run directory: {missing} does not exist"


def test_a_bug_shows_its_traceback_and_the_run_so_far(tmp_path, monkeypatch, capsys):
    """A ValueError or OSError the CLI does not know is not the user's to fix: it is shown with its traceback
    (exit 1), and, when the run has logged steps, the doctor command that reads them."""
    from grpo_lib import cli, runlog

    def broken_train(args):
        raise ValueError("index 7 is out of bounds")  # what a bug deep in a step raises

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runlog.LOG_NAME).write_text('{"step": 1}\n')  # a step was logged before the bug
    monkeypatch.setattr(cli, "cmd_train", broken_train)
    assert cli.main(["train", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ValueError("index 7 is out of bounds")' in err
    assert err.splitlines()[-1] == (f"an unexpected error (see above); the steps logged before it are in "
                                    f"{run_dir / runlog.LOG_NAME}: `python -m grpo_lib doctor {run_dir}` reads them")

    monkeypatch.setattr(cli, "cmd_plan", lambda args: open(tmp_path / "gone" / "x"))  # an OSError
    assert cli.main(["plan"]) == 1
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err and "Traceback" in err
    assert err.splitlines()[-1].startswith("an unexpected error (a bug in grpo_lib or a library it calls")


NO_NOTEBOOK_PACKAGES = """
import sys

class NoNotebookPackages:  # as if ipywidgets and IPython were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("ipywidgets", "IPython"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

sys.meta_path.insert(0, NoNotebookPackages())
for name in ("ipywidgets", "IPython"):
    try:
        __import__(name)
        sys.exit(f"the blocker let {name} through")
    except ModuleNotFoundError:
        pass
from grpo_lib.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("ipywidgets", "IPython", "ipykernel"))
print("NOTEBOOK MODULES", loaded)
sys.exit(code)
"""


def test_train_runs_without_notebook_packages(tmp_path):
    """The command line's training needs no ipywidgets or IPython: its terminal dashboard is grpo_lib.console."""
    out = subprocess.run([sys.executable, "-c", NO_NOTEBOOK_PACKAGES, "train", *SMALL[:2], "--steps", "1",
                          *SMALL[6:], "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=900, cwd=Path(__file__).parents[1])  # seconds alone; minutes on a loaded machine
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NOTEBOOK MODULES []" in out.stdout
    assert [r.step for r in runlog.load_run_log(tmp_path / "run")] == [1]
    assert "step 1/1  reward" in out.stdout  # the terminal dashboard's step line (tqdm.write)


def test_a_local_model_folder_is_planned_from_its_config(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from grpo_lib import memory, memory_advice, model_specs
    from grpo_lib.config import GRPOConfig

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    spec = model_specs.model_spec(str(tmp_path))
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_kv_heads) == (1000, 64, 2, 2)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "default_device_bytes", lambda device="cuda": memory.T4_REPORTED_BYTES)
    report = memory_advice.plan_or_refuse(GRPOConfig(model=str(tmp_path)))
    assert report is not None and report.fits
    with pytest.raises(memory_advice.MemoryPlanError, match="would not fit on this GPU. Cheaper settings"):
        memory_advice.plan_or_refuse(GRPOConfig(model="Qwen/Qwen2.5-7B-Instruct", load_in_4bit=False, lora_r=16))
