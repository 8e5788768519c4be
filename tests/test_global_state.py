"""Global state is touched only inside the calls that need it: importing grpo_lib.models leaves the process's
warning filters and logger levels alone; loading a policy silences its two library notices for the load only;
sampling leaves the tokenizer's padding_side as the caller set it. Run in a fresh interpreter, so the imports
are really first imports."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, logging, warnings
import sys
import torch, transformers  # their own import-time filters are not grpo_lib's

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"

def levels():
    return {name: logging.getLogger(name).level for name in ("", BNB_LOGGER, "transformers", "peft")}

out = {}
filters, before = list(warnings.filters), levels()
import grpo_lib.models, grpo_lib.sampling
out["import_filters_same"] = warnings.filters == filters
out["import_levels"] = [before, levels()]
out["bnb_before_load"] = "bitsandbytes" in sys.modules  # so the load is what imports it (through peft)

with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    filters, before = list(warnings.filters), levels()
    model, tokenizer = grpo_lib.models.load_policy("smollm2-135m", lora_r=4, gradient_checkpointing=True)
    out["load_filters_same"] = warnings.filters == filters
    out["load_levels"] = [before, levels()]
out["load_warnings"] = [str(w.message) for w in seen]

tokenizer.padding_side = "right"  # the caller's setting (e.g. for a batch of training texts)
torch.manual_seed(0)
rollout = grpo_lib.sampling.sample_groups(model, tokenizer, ["Hi", "Name three prime numbers below twenty."],
                                          num_generations=2, max_completion_length=2)
out["padding_side"] = tokenizer.padding_side
out["prompt_mask"] = rollout.prompt_mask.tolist()
print("RESULT " + json.dumps(out))
"""


def test_imports_loading_and_sampling_leave_global_state_alone():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["import_filters_same"] and out["import_levels"][0] == out["import_levels"][1]
    assert out["load_filters_same"] and out["load_levels"][0] == out["load_levels"][1]
    # the notices themselves stayed quiet during the load (the process's "always" filter would have shown them)
    assert not any("is_gradient_checkpointing" in m for m in out["load_warnings"])
    # bitsandbytes' CPU-kernel notice, logged when peft first imports it: inside the load
    assert not out["bnb_before_load"] and "pip install kernels" not in proc.stderr
    assert out["padding_side"] == "right"
    short, long = out["prompt_mask"]  # the prompts were still left-padded: the short one starts with padding
    assert short[0] == 0 and short[-1] == 1 and all(long)
