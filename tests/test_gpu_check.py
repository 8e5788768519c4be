"""scripts/gpu_check.py's CPU smoke run: every phase of the colab-t4 code path (4-bit + LoRA, fp16) runs on a
2-layer random Qwen2, has a plan, a finite time, and rewards/advantages that agree with each other."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~20 s: a subprocess that imports torch, builds, quantises and trains a model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
PHASES = ("load (transient peak)", "resident after load", "generation", "log-probs, no grad",
          "reference (adapters off)", "log-probs + loss + backward", "trainer step 1")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


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


def test_every_phase_is_planned_and_timed(smoke):
    result, stdout = smoke
    assert result["ok"] and not result["failures"]
    phases = {p["phase"]: p for p in result["phases"]}
    assert set(PHASES) <= set(phases), sorted(phases)
    for name in PHASES:
        p = phases[name]
        assert p["planned_bytes"] > 0, name
        assert math.isfinite(p["seconds"]) and p["seconds"] >= 0, name
        assert p["measured_bytes"] is None and not p["checked"], "nothing GPU-specific is measured on CPU"
    step = result["steps"][0]
    assert math.isfinite(step["seconds"]) and step["seconds"] > 0
    assert step["planned_bytes"] > 0 and math.isfinite(step["loss"])
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert result["config"]["dtype"] == "float16" and result["config"]["load_in_4bit"]
    assert result["env"]["torch"] and result["env"]["bitsandbytes"]
    assert "RESULT: ok" in stdout and "native bf16" in stdout


def test_rewards_and_advantages_are_consistent(smoke):
    result, _ = smoke
    r = result["rewards"]
    G = r["num_generations"]
    weights = r["weights"]
    for row, total in zip(r["per_func"], r["total"]):  # total = sum of the weighted rewards that apply
        applied = [w * v for w, v in zip(weights, row) if v is not None]
        assert total == pytest.approx(sum(applied), abs=1e-5)
    _assert_group_consistent(r["total"], r["advantages"], G)
    assert any(a != 0 for a in r["advantages"]), "the spread reward gives a random model's groups some variance"
    for step in result["steps"]:
        _assert_group_consistent(step["total"], step["advantages"], G)
