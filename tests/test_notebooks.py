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
import torch

from tests import fp16_matmuls

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01_sampling_groups", "02_rewards", "03_advantages", "04_loss_and_kl", "05_train_4bit_lora",
            "06_scale_out", "07_variants_and_diagnostics", "08_code_rewards"]
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
    from grpo_lib.notebook_setup import CPU_PRESET, GPU_PRESET, install_cell

    nb = read(path)
    cells = code_cells(nb)
    extras = "[trl]" if path.stem == "06_scale_out" else ""
    assert cells[0].source == install_cell(extras), f"{path.name}: the install cell differs from notebook_setup.INSTALL_CELL"
    params = parameters(nb)
    assert params["PRESET"] is None and params["MODEL"] is None, "committed notebooks choose the preset from the hardware"
    assert set(params["OVERRIDES"]) <= set(PRESETS), "OVERRIDES names presets"
    assert {CPU_PRESET, GPU_PRESET} <= set(params["OVERRIDES"]), "OVERRIDES has an entry for each hardware's preset"
    assert "choose_preset(PRESET)" in "\n".join(c.source for c in cells), "the preset comes from notebook_setup"
    assert "self-check passed" in cells[-1].source and "assert" in cells[-1].source, "the last code cell is the self-check"
    assert "**Next:**" in nb.cells[-1].source
    assert "$$" in nb.cells[0].source, "the first cell states the equation the notebook teaches"


MEASURED = re.compile(r"(?<![\w.])\d+\.\d+(?!\w|\.\d)%?|(?<![\w.])\d+%")
"""A number that looks measured: a decimal (0.35, 1.4997) or a percentage (53%). Not part of a name or version
(Qwen2.5-1.5B, v0.2.0), not an integer (G = 8, step 3)."""

PROSE_CONSTANTS = {
    "0.28": "DAPO's clip-higher epsilon_high",
    "0.4": "notebook 07's SHIFT, a log-ratio it sets",
    "7.0": "a spelling of an answer that answer_reward tolerates",
    "0.5": "a math answer written several ways (1/2)",
    "0.1": "an example gap between two rewards",
}
"""Decimals prose may quote beside the presets' own values: constants of an equation or an example, never a result."""


def prose_allowed_numbers() -> set[str]:
    """PROSE_CONSTANTS and every float-valued field of every preset (epsilon 0.2, temperature 1.0, ...)."""
    from dataclasses import fields

    from grpo_lib.config import PRESETS, GRPOConfig

    values = {getattr(GRPOConfig.preset(name), f.name) for name in PRESETS for f in fields(GRPOConfig)}
    return set(PROSE_CONSTANTS) | {str(v) for v in values if isinstance(v, float)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_quotes_no_measured_number(path):
    """Prose that quotes a result goes stale when a seed, a preset or the library changes. A notebook states
    measured numbers in a cell that computes them (an IPython.display.Markdown(f"...") cell, or a print beside an
    assert); its markdown cells may hold only constants (prose_allowed_numbers)."""
    allowed = prose_allowed_numbers()
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type == "markdown":
            quoted = set(MEASURED.findall(cell.source)) - allowed
            assert not quoted, (f"{path.name}: markdown cell {i} quotes {sorted(quoted)}: generate the sentence from "
                                f"the values (Markdown(f\"...\")), or add a true constant to PROSE_CONSTANTS")


def test_the_measured_number_pattern():
    found = MEASURED.findall("A = -0.35 and 1.4997, 53% of prompts; Qwen2.5-1.5B, v0.2.0, trl==1.16.0, G = 8, "
                             "1e-4, eps 0.2.")
    assert found == ["0.35", "1.4997", "53%", "0.2"]


def test_full_run_and_scale_out_share_one_config():
    """06 exports notebook 05's config: their parameters must not drift apart."""
    p05, p06 = (parameters(read(NOTEBOOKS_DIR / f"{n}.ipynb")) for n in ("05_train_4bit_lora", "06_scale_out"))
    assert p05["OVERRIDES"] == p06["OVERRIDES"]


def test_loading_fields_are_what_load_policy_from_config_reads():
    """notebook_setup.same_policy compares exactly the fields the loader reads: a new one read there fails here."""
    import inspect

    from grpo_lib import models
    from grpo_lib.notebook_setup import LOADING_FIELDS

    read = set(re.findall(r"\bconfig\.(\w+)", inspect.getsource(models.load_policy_from_config)))
    assert read == set(LOADING_FIELDS)


def test_same_policy():
    from grpo_lib.config import GRPOConfig
    from grpo_lib.notebook_setup import same_policy

    base = GRPOConfig.preset("cpu-tiny")
    assert same_policy(base, base.replace(temperature=1.3, max_steps=3))  # sampling and run knobs: same weights
    assert not same_policy(base, base.replace(seed=1))  # another LoRA initialisation
    assert not same_policy(base, base.replace(lora_r=4))


def test_scored_batch_is_the_trainers_first_three_steps(tiny_model, tokenizer):
    """Sampled under config.seed (twice the same), scored as TRL calls reward functions, z-scored per group."""
    from grpo_lib import data
    from grpo_lib.answers import completion_text
    from grpo_lib.config import GRPOConfig
    from grpo_lib.notebook_setup import scored_batch

    def characters(completions, **kwargs):  # a reward that differs between random completions
        return [float(len(completion_text(c))) for c in completions]

    config = GRPOConfig(model="smollm2-135m", task="larger", prompts_per_step=2, num_generations=4,
                        max_completion_length=6)
    batch = scored_batch(tiny_model, tokenizer, config, reward_funcs=[characters])
    again = scored_batch(tiny_model, tokenizer, config, reward_funcs=[characters])
    texts = batch.rollout.completion_texts
    assert texts == again.rollout.completion_texts and len(texts) == 8
    assert [r["answer"] for r in batch.rows] == [r["answer"] for r in data.task_rows(config, "train", n=2)]
    r = torch.tensor([float(len(t)) for t in texts]).view(2, 4)
    assert torch.equal(batch.rewards, r)
    for g in range(2):  # the z-score by hand: (r - mean) / (unbiased std + 1e-4), 0 in a flat group
        flat = bool(r[g].max() == r[g].min())
        want = torch.zeros(4) if flat else (r[g] - r[g].mean()) / (r[g].std() + 1e-4)
        assert torch.allclose(batch.advantages[g], want, atol=1e-6) and bool(batch.zero_std[g]) == flat


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
        task = "humaneval" if path.stem == "08_code_rewards" else "gsm8k"  # 08 runs the preset's code variant
        for setting in ("load_in_4bit = True", "gradient_checkpointing = True", "dtype = 'float16'",
                        "num_generations = 8", f"task = '{task}'"):
            name, value = setting.split(" = ")
            assert re.search(rf"{name}\s+= {re.escape(value)}", printed), setting
