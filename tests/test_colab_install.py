"""The Colab install flow, end to end: a fresh virtual environment holding what a Colab runtime has (torch,
ipykernel, ipywidgets 7, matplotlib, pandas) and no grpo_lib; notebook 01 copied to a folder outside the clone and
executed there, its first cell installing grpo_lib from this clone ($GRPO_LIB_SOURCE) with the pinned Hugging Face
stack, and the rest of it running on what that installed. Colab's own torch and ipywidgets must survive."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLAB_HAS = ["torch==2.13.0", "ipykernel==7.4.0", "ipywidgets==7.7.1", "matplotlib==3.11.2", "pandas==3.1.1",
             "nbclient==0.11.0", "nbformat==5.11.1"]
"""A Colab runtime's preinstalled packages that matter here (its kernel imports ipywidgets 7 at start); the CPU
torch wheel stands in for Colab's CUDA build."""

RUN = """
import sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=600, kernel_name="colab").execute()
print("SELF-CHECK:", any("self-check passed" in o.get("text", "") for o in nb.cells[-2].outputs))
"""


def venv_python(tmp_path: Path) -> Path:
    venv = tmp_path / "colab-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *COLAB_HAS], check=True)
    subprocess.run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "colab"], check=True,
                   capture_output=True)
    return python


def versions(python: Path, *packages: str) -> dict:
    code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {list(packages)!r}}}))"
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


@pytest.mark.slow
def test_notebook_01_installs_grpo_lib_and_runs_in_a_fresh_colab_like_environment(tmp_path):
    python = venv_python(tmp_path)
    # (cwd outside the clone: `python -c` puts the working directory on sys.path)
    missing = subprocess.run([str(python), "-c", "import grpo_lib"], capture_output=True, cwd=tmp_path)
    assert missing.returncode != 0, "the fresh environment must not have grpo_lib yet"
    before = versions(python, "torch", "ipywidgets")

    work = tmp_path / "content"  # outside the clone, like Colab's /content
    work.mkdir()
    notebook = work / "01_sampling_groups.ipynb"
    shutil.copy(ROOT / "notebooks" / notebook.name, notebook)
    env = {"GRPO_LIB_SOURCE": str(ROOT), "GRPO_PRESET": "cpu-tiny", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run([str(python), "-c", RUN, str(notebook)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SELF-CHECK: True" in done.stdout

    installed = subprocess.run([str(python), "-c", "import grpo_lib; print(grpo_lib.__file__)"],
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(ROOT) not in installed and "site-packages" in installed, "installed from the source, not imported from the clone"
    assert versions(python, "torch", "ipywidgets") == before, "Colab's torch and ipywidgets are kept"
    assert versions(python, "transformers", "peft")["transformers"] == "5.23.0"
