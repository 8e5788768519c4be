"""The notebooks: every one runs top to bottom at the cpu-tiny preset, and the committed copies are clean.

The slow tests execute each notebook with nbclient in a fresh kernel ("python3", the environment's own),
with GRPO_PRESET=cpu-tiny and the working directory notebooks/, as a user in a clone would. Like papermill,
the test injects a cell after the one tagged `parameters`: it points RUN_ROOT at a temporary directory so
that run directories and adapters do not pile up in notebooks/runs.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01_sampling_groups", "02_rewards", "03_advantages", "04_loss_and_kl", "05_train_4bit_lora",
            "06_scale_out"]
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
    """Install cell first, one papermill parameters cell with the preset knobs, a self-check, a Next link."""
    from grpo_lib.config import PRESETS
    from grpo_lib.notebook_setup import REPO_URL

    nb = read(path)
    cells = code_cells(nb)
    install = cells[0].source
    assert f'REPO_URL = "{REPO_URL}"' in install and 'find_spec("grpo_lib") is None' in install
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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu_tiny(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("GRPO_PRESET", "cpu-tiny")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = read(path)
    if "RUN_ROOT" in parameters(nb):
        inject_after_parameters(nb, f"RUN_ROOT = {str(tmp_path / 'runs')!r}")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    start = time.time()
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    print(f"{path.name}: {time.time() - start:.0f} s")
    errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    last = code_cells(nb)[-1].outputs
    assert any("self-check passed" in o.get("text", "") for o in last), "the self-check cell printed its verdict"
