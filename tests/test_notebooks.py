"""The notebooks: every one runs top to bottom on both presets' code paths, and the committed copies are clean.

The slow tests execute each notebook with nbclient in a fresh kernel ("python3", the environment's own), in the
working directory notebooks/, as a user in a clone would. Like papermill, a test injects a cell after the one
tagged `parameters`: it points RUN_ROOT at a temporary directory (no run directories pile up in notebooks/runs)
and sets the preset. Two runs of each notebook:

- cpu-tiny with the model on a simulated GPU (tests/fake_cuda.py): every cell that mixes the model's device with
  the CPU, or hands a GPU tensor to numpy or matplotlib, fails as it would in Colab;
- the colab-t4 preset's code path on the CPU: nf4 + LoRA, gradient checkpointing, fp16 compute with loss scaling,
  G = 8, GSM8K, on the embedded SmolLM2-135M, with completions cut down in length and steps only (COLAB_T4_CUTS);
  fp16 matrix products computed the way a GPU's tensor cores do (tests/fp16_matmuls.py).
"""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

from tests import fp16_matmuls

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01_sampling_groups", "02_rewards", "03_advantages", "04_loss_and_kl", "05_train_4bit_lora",
            "06_scale_out", "07_variants_and_diagnostics"]
NOTEBOOKS = [NOTEBOOKS_DIR / f"{name}.ipynb" for name in EXPECTED]
CELL_TIMEOUT_S = 600  # one cell; the budget of a whole notebook on a 2-core CPU is 5 minutes
KERNEL = "python3"


def read(path: Path):
    return nbformat.read(path, as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def parameters_cell(nb):
    tagged = [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def parameters(nb) -> dict:
    """The literal assignments of the parameters cell, e.g. {"PRESET": None, "OVERRIDES": {...}}."""
    out = {}
    for node in ast.parse(parameters_cell(nb).source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, "the parameters cell holds only NAME = literal"
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


# ----------------------------------------------------------------------------------------------
# fast: what is committed
# ----------------------------------------------------------------------------------------------


def test_the_series_is_complete():
    found = sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path):
    """No outputs, no execution counts, no widget state: diffs show only what a person wrote."""
    nb = read(path)
    nbformat.validate(nb)
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [], f"{path.name}: code cell {i} has outputs; clear them before committing"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the notebook metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_series_layout(path):
    """Install cell first (the same in every notebook, but for the extras), one papermill parameters cell with
    the preset knobs, a self-check, a Next link."""
    from grpo_lib.config import PRESETS
    from grpo_lib.notebook_setup import install_cell

    nb = read(path)
    cells = code_cells(nb)
    extras = "[trl]" if path.stem == "06_scale_out" else ""
    assert cells[0].source == install_cell(extras), f"{path.name}: the install cell differs from notebook_setup.INSTALL_CELL"
    params = parameters(nb)
    assert params["PRESET"] is None and params["MODEL"] is None, "committed notebooks choose the preset from the hardware"
    assert set(params["OVERRIDES"]) == set(PRESETS), "OVERRIDES has one entry per preset"
    assert "choose_preset(PRESET)" in "\n".join(c.source for c in cells), "the preset comes from notebook_setup"
    assert "self-check passed" in cells[-1].source and "assert" in cells[-1].source, "the last code cell is the self-check"
    assert "**Next:**" in nb.cells[-1].source
    assert "$$" in nb.cells[0].source, "the first cell states the equation the notebook teaches"


def test_full_run_and_scale_out_share_one_config():
    """06 exports notebook 05's config: their parameters must not drift apart."""
    p05, p06 = (parameters(read(NOTEBOOKS_DIR / f"{n}.ipynb")) for n in ("05_train_4bit_lora", "06_scale_out"))
    assert p05["OVERRIDES"] == p06["OVERRIDES"]


# ----------------------------------------------------------------------------------------------
# slow: run every notebook
# ----------------------------------------------------------------------------------------------


def inject_after_parameters(nb, source: str) -> None:
    """What papermill does: a cell right after the parameters cell that overrides some of them."""
    at = nb.cells.index(parameters_cell(nb)) + 1
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at, cell)


def test_the_install_cell_points_at_this_release():
    import grpo_lib
    from grpo_lib.notebook_setup import INSTALL_CELL, LIB_SOURCE

    assert LIB_SOURCE.endswith(f"@v{grpo_lib.__version__}") and LIB_SOURCE in INSTALL_CELL
    assert "torch" not in INSTALL_CELL.split("import grpo_lib")[0].split("pip")[-1], "Colab's torch is never touched"


def execute(path: Path, tmp_path: Path, injected: str, env: dict | None = None, kernel: str = KERNEL,
            cwd: Path = NOTEBOOKS_DIR):
    """Run a notebook top to bottom with `injected` after its parameters cell; return it with its outputs."""
    nbclient = pytest.importorskip("nbclient")
    nb = read(path)
    inject_after_parameters(nb, injected)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                                     resources={"metadata": {"path": str(cwd)}})
    start = time.time()
    if env:
        with pytest.MonkeyPatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            client.execute()  # raises CellExecutionError with the failing cell and its traceback
    else:
        client.execute()
    print(f"{path.name}: {time.time() - start:.0f} s")
    errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    last = code_cells(nb)[-1].outputs
    assert any("self-check passed" in o.get("text", "") for o in last), "the self-check cell printed its verdict"
    return nb


def run_root_line(nb_path: Path, tmp_path: Path) -> str:
    return f"RUN_ROOT = {str(tmp_path / 'runs')!r}\n" if "RUN_ROOT" in parameters(read(nb_path)) else ""


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu_tiny_with_the_model_on_a_gpu(path, tmp_path):
    """cpu-tiny, the model on a simulated cuda:0 (tests/fake_cuda.py): device mistakes fail as in Colab."""
    from tests.fake_cuda import notebook_cell

    injected = run_root_line(path, tmp_path) + notebook_cell(str(NOTEBOOKS_DIR.parent))
    execute(path, tmp_path, injected, env={"GRPO_PRESET": "cpu-tiny", "TOKENIZERS_PARALLELISM": "false"})


COLAB_T4_CUTS = {"model": "smollm2-135m", "max_completion_length": 48, "max_steps": 2, "num_eval_prompts": 4,
                 "dtype": "float16", "save_steps": 1}
"""The colab-t4 preset on a CPU: a small model, shorter completions, fewer steps; everything else (nf4 + LoRA,
gradient checkpointing, G = 8, 4 GSM8K prompts a step) is the preset's. fp16 is the T4's compute dtype, which
"auto" only picks on a GPU, so it is set here; the trainer then scales the loss (torch's CPU GradScaler). A CPU
multiplies fp16 matrices ~60x slower than fp32, so the kernel computes them in fp32 and rounds to fp16 as a T4's
tensor cores do (tests/fp16_matmuls.py); every tensor stays float16."""


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_colab_t4_path(path, tmp_path):
    cuts = {k: v for k, v in COLAB_T4_CUTS.items() if k != "model"}
    injected = (run_root_line(path, tmp_path) + f"PRESET = 'colab-t4'\nMODEL = {COLAB_T4_CUTS['model']!r}\n"
                f"OVERRIDES['colab-t4'] = {{**OVERRIDES['colab-t4'], **{cuts!r}}}\n" + fp16_matmuls.notebook_cell())
    nb = execute(path, tmp_path, injected, env={"TOKENIZERS_PARALLELISM": "false"})
    printed = "".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs)
    if "load_in_4bit" in printed:  # the config summary: the preset's settings were used
        for setting in ("load_in_4bit = True", "gradient_checkpointing = True", "dtype = 'float16'",
                        "num_generations = 8", "task = 'gsm8k'"):
            name, value = setting.split(" = ")
            assert re.search(rf"{name}\s+= {re.escape(value)}", printed), setting
