"""The memory planner: the architecture table (model_specs), hand-checkable components of the estimate
(memory), the T4 preset, the report and advice (memory_advice), and the prediction against the measured
resident-memory increase of real CPU training steps."""

import importlib.util
from pathlib import Path

import pytest
import torch

from grpo_lib import memory, memory_advice, model_specs
from grpo_lib.config import GRPOConfig
from grpo_lib.memory import GiB

ROOT = Path(__file__).resolve().parent.parent


def load_memory_check():
    spec = importlib.util.spec_from_file_location("memory_check", ROOT / "bench" / "memory_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------

# parameter counts the model cards give (embeddings included)
PUBLISHED_PARAMS = {
    "Qwen/Qwen2.5-0.5B-Instruct": 0.494e9, "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
    "Qwen/Qwen2.5-3B-Instruct": 3.09e9, "Qwen/Qwen2.5-7B-Instruct": 7.61e9,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 0.1345e9, "HuggingFaceTB/SmolLM2-360M-Instruct": 0.362e9,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1.71e9, "meta-llama/Llama-3.2-1B-Instruct": 1.24e9,
    "meta-llama/Llama-3.2-3B-Instruct": 3.21e9,
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_PARAMS))
def test_builtin_specs_match_published_parameter_counts(hub_id):
    spec = model_specs.model_spec(hub_id)
    assert spec.num_params == pytest.approx(PUBLISHED_PARAMS[hub_id], rel=0.01)


def test_model_names_resolve_with_or_without_org_and_suffix():
    spec = model_specs.model_spec("Qwen/Qwen2.5-1.5B-Instruct")
    assert model_specs.model_spec("qwen2.5-1.5b") is spec
    assert model_specs.model_spec("Qwen2.5-1.5B-Instruct") is spec
    assert model_specs.model_spec("smollm2-135m").name == "SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="Qwen2.5-1.5B-Instruct"):  # the message lists what is known
        model_specs.model_spec("some-org/unknown-model")


def test_spec_of_a_loaded_model_counts_its_parameters_and_lora(tiny_model):
    from tests.conftest import add_random_lora

    model = add_random_lora(tiny_model, r=4)
    spec = model_specs.model_spec(model)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert spec.num_params == base_params
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert spec.lora_params(4, "all-linear") == lora
    assert model_specs.model_spec(model.config) == spec  # a transformers config gives the same spec


# ----------------------------------------------------------------------------------------------
# components by hand
# ----------------------------------------------------------------------------------------------


def test_persistent_components_by_hand():
    c = GRPOConfig.preset("cpu-tiny")
    r = memory.estimate(c, "smollm2-135m", device="cpu")
    spec = model_specs.model_spec("smollm2-135m")
    assert r.components["weights"] == spec.num_params * 4  # fp32 on CPU
    lora = 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # q, o; k, v; gate, up, down
    assert r.components["lora_params"] == lora * 4
    assert r.components["gradients"] == lora * 4
    assert r.components["optimizer_states"] == 2 * lora * 4
    assert r.components["cuda_context"] == 0
    # KV cache: 32 rows x (81 + 24) tokens x 30 layers x (k, v) x 3 heads x 64 x fp32
    assert memory.estimate(c, "smollm2-135m", device="cpu", prompt_length=81).components["kv_cache"] == \
        32 * 105 * 30 * 2 * 192 * 4


def test_four_bit_weights_and_fp32_embeddings():
    c = GRPOConfig.preset("colab-t4")
    spec = model_specs.model_spec(c.model)
    r = memory.estimate(c, c.model)
    # nf4 linear layers (~0.516 bytes/param with double quantisation) + fp32 embeddings/norms/biases
    assert r.components["weights"] == round(spec.linear_params * memory.NF4_BYTES_PER_PARAM + spec.other_params * 4)
    assert any("fp32" in n for n in r.notes)


def test_total_is_persistent_plus_largest_phase():
    r = memory.estimate(GRPOConfig.preset("colab-t4"), "Qwen2.5-1.5B-Instruct")
    c = r.components
    assert r.total_bytes == r.persistent_bytes + max(r.phases.values())
    assert r.persistent_bytes == sum(c[k] for k in ("weights", "lora_params", "gradients", "optimizer_states",
                                                     "cuda_context"))
    assert r.phases["generation"] == c["kv_cache"] + c["sampling_buffers"]
    # the head's backward frees its logits before a layer's backward starts: the larger of the two counts
    assert r.phases["training"] == c["activations"] + max(c["logits"], c["layer_backward"])
    assert r.peak_phase == "training"
    assert r.step_bytes == r.components["gradients"] + r.components["optimizer_states"] + r.phases["training"]


def test_cheaper_knobs_lower_the_prediction():
    base = GRPOConfig.preset("colab-t4", gradient_checkpointing=False)
    r = memory.estimate(base, "Qwen2.5-1.5B-Instruct")
    c = r.components
    assert r.activations_no_checkpointing == c["activations"] + c["layer_backward"] > r.activations_checkpointing
    assert r.phases["training"] == c["activations"] + max(c["logits"], c["layer_backward"])
    for change in (dict(gradient_checkpointing=True), dict(gradient_accumulation_steps=16),
                   dict(max_completion_length=128), dict(num_generations=4), dict(logprob_chunk_size=256)):
        assert memory.estimate(base.replace(**change), "Qwen2.5-1.5B-Instruct").total_bytes < r.total_bytes, change
    # the shared-prompt path calls backward once every groups_per_backward groups: with one group a backward,
    # micro-batches of whole groups (4 prompts, gradient_accumulation_steps 2 or 4) train in the same memory;
    # the reference pass runs a micro-batch at once, so smaller ones shrink it
    one = base.replace(groups_per_backward=1)
    r1 = memory.estimate(one, "Qwen2.5-1.5B-Instruct")
    assert r1.phases["training"] < r.phases["training"]  # the default, 2 groups a backward, holds more
    for ga in (2, 4):
        smaller = memory.estimate(one.replace(gradient_accumulation_steps=ga), "Qwen2.5-1.5B-Instruct")
        assert smaller.phases["training"] == r1.phases["training"]
        assert smaller.phases["reference"] < r1.phases["reference"]
    ckpt = base.replace(gradient_checkpointing=True, share_prompt_forward=False)  # a micro-batch is one backward
    assert (memory.estimate(ckpt.replace(gradient_accumulation_steps=4), "Qwen2.5-1.5B-Instruct").total_bytes
            < memory.estimate(ckpt, "Qwen2.5-1.5B-Instruct").total_bytes)
    full = memory.estimate(base.replace(load_in_4bit=False), "Qwen2.5-1.5B-Instruct")
    assert full.components["weights"] > r.components["weights"]


def test_top_entropy_quantile_keeps_the_micro_batch_in_one_backward():
    """With top_entropy_quantile < 1 the shared-prompt path calls backward once per micro-batch (the quantile
    is over all its tokens): activations of all its groups at once. 4 prompts in one micro-batch: exactly 4x
    one group's (tokens, keys/values and the prompt's keys all scale with the groups)."""
    base = GRPOConfig.preset("colab-t4", gradient_checkpointing=False, groups_per_backward=1)
    spec = "Qwen2.5-1.5B-Instruct"
    per_group = memory.estimate(base, spec)
    whole = memory.estimate(base.replace(top_entropy_quantile=0.2), spec)
    assert base.prompts_per_step == 4 and whole.settings["groups_per_micro_batch"] == 4
    assert whole.components["activations"] == pytest.approx(4 * per_group.components["activations"], rel=1e-9)
    assert whole.components["layer_backward"] > per_group.components["layer_backward"]
    assert whole.components["reference_pass"] == per_group.components["reference_pass"]  # no grad: the micro-batch
    assert not whole.settings["backward_per_group"] and per_group.settings["backward_per_group"]
    assert "a backward every 1 group(s)" in memory_advice.format_report(per_group)
    assert "a backward every" not in memory_advice.format_report(whole)
    # one group per micro-batch, or the plain path: a backward per micro-batch anyway
    for same in (dict(gradient_accumulation_steps=4), dict(share_prompt_forward=False)):
        assert (memory.estimate(base.replace(top_entropy_quantile=0.2, **same), spec).phases
                == memory.estimate(base.replace(**same), spec).phases), same
    # under gradient checkpointing the shared path (and its backward per group) stays
    ckpt = base.replace(gradient_checkpointing=True)
    assert memory.estimate(ckpt, spec).settings["backward_per_group"]
    assert (memory.estimate(ckpt.replace(top_entropy_quantile=0.2), spec).phases["training"]
            > memory.estimate(ckpt, spec).phases["training"])


# ----------------------------------------------------------------------------------------------
# the Colab T4 preset, the report and the advice
# ----------------------------------------------------------------------------------------------


def test_colab_t4_preset_fits_a_t4():
    c = GRPOConfig.preset("colab-t4")
    assert c.model == "Qwen/Qwen2.5-1.5B-Instruct" and c.load_in_4bit and c.max_completion_length >= 256
    r = memory.estimate(c, c.model, memory.T4_REPORTED_BYTES)
    assert r.total_bytes <= 14 * GiB
    assert r.fits


def test_default_device_bytes_without_a_gpu():
    r = memory.estimate(GRPOConfig.preset("colab-t4"), "Qwen2.5-0.5B-Instruct")
    colab_t4 = 15633680957  # int(14.56 GiB): the least a Colab T4 reports
    expected = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else colab_t4
    assert r.device_bytes == expected


def test_7b_does_not_fit_the_t4_preset_and_the_advice_says_what_would():
    # without the shared-prompt forward (with it, checkpointed, the 7B plans at ~96% of 15 GiB: "tightly")
    c = GRPOConfig.preset("colab-t4", share_prompt_forward=False)
    r = memory.estimate(c, "Qwen/Qwen2.5-7B-Instruct", 15 * GiB)
    assert not r.fits
    text = memory_advice.format_report(r)
    assert "does NOT fit" in text and "weights" in text and "activations" in text
    advice = memory_advice.suggest_cheaper(c, "Qwen/Qwen2.5-7B-Instruct", 15 * GiB)
    assert advice[0].startswith("now:")
    fitting = [a for a in advice[1:] if "(fits in" in a]
    assert fitting and "gradient_accumulation_steps" in fitting[0]
    assert any(a.startswith("smaller model") for a in advice)


def test_format_report_lists_every_component_and_the_verdict():
    c = GRPOConfig.preset("colab-t4")
    text = memory_advice.format_report(memory.estimate(c, c.model, 15 * GiB))
    for label in ("weights", "LoRA parameters", "gradients", "AdamW states", "KV cache", "activations",
                  "logits chunks", "CUDA context", "predicted peak", "verdict: fits"):
        assert label in text, label
    print(text)


def test_a_plan_above_93_percent_of_the_device_fits_tightly():
    """The verdict and the advice share one rule: a plan that fits but takes more than TIGHT = 93% of the
    device fits tightly (the caching allocator's fragmentation may tip it over)."""
    c = GRPOConfig.preset("colab-t4")
    total = memory.estimate(c, c.model, 15 * GiB).total_bytes
    for share, verdict, word in ((0.95, "fits, but tightly (95% of the device)", "fits tightly"),
                                 (0.90, "fits (90% of the device)", "fits")):
        device_bytes = round(total / share)
        report = memory.estimate(c, c.model, device_bytes)
        assert memory_advice._verdict(report).startswith(verdict)
        now = memory_advice.suggest_cheaper(c, c.model, device_bytes)[0]
        assert now.endswith(f"({word} in {memory.bytes_text(device_bytes)})"), now


def test_cli_plan_prints_the_table_and_exits_by_the_verdict():
    from grpo_lib.cli import main

    assert main(["plan", "--preset", "colab-t4"]) == 0
    assert main(["plan", "--preset", "colab-t4", "--set", "model=Qwen/Qwen2.5-7B-Instruct",
                 "--set", "share_prompt_forward=False"]) == 1


# ----------------------------------------------------------------------------------------------
# the prediction against measured CPU training steps
# ----------------------------------------------------------------------------------------------

MEASURED_CASES = ("tiny-g8-t64", "tiny-wide-g8-t96-ckpt", "smollm2-g4-t48")


@pytest.mark.slow
def test_prediction_within_30_percent_of_measured_cpu_steps():
    """Each case: a fresh process loads the model, runs one real GRPOTrainer.step() and reports its
    peak resident-memory increase over the loaded baseline; compared with MemoryReport.step_bytes
    (activations + logits chunk, or KV cache + sampling buffers, + gradients and AdamW states)."""
    mc = load_memory_check()
    results = [mc.run_in_subprocess(name) for name in MEASURED_CASES]
    print("\n" + mc.format_table(results))
    for r in results:
        ratio = r["predicted_bytes"] / r["measured_bytes"]
        assert 0.7 <= ratio <= 1.3, (r["case"], r["predicted_bytes"], r["measured_bytes"])
    assert len({r["model"] for r in results}) >= 2 and len({r["config"]["num_generations"] for r in results}) >= 2


def test_merged_sampling_weights_are_planned_without_4bit_only():
    """Sampling merges LoRA into a copy of the adapted weights (models.merged_adapters): the generation
    phase holds one more copy of every adapted linear weight, in the compute dtype, unless the base is 4-bit."""
    from grpo_lib.config import GRPOConfig
    from grpo_lib.memory import estimate
    from grpo_lib.model_specs import MODEL_SPECS

    spec = MODEL_SPECS["Qwen2.5-1.5B-Instruct"]
    plain = estimate(GRPOConfig(load_in_4bit=False), spec, device="cuda")
    assert plain.components["merged_weights"] == spec.linear_params * 2  # all-linear, bf16/fp16
    q_only = estimate(GRPOConfig(load_in_4bit=False, lora_target_modules="q_proj"), spec, device="cuda")
    assert q_only.components["merged_weights"] == spec.num_layers * spec.hidden_size * spec.q_dim * 2
    assert estimate(GRPOConfig(), spec, device="cuda").components["merged_weights"] == 0  # nf4: nothing merged
    assert plain.phases["generation"] == sum(plain.components[k] for k in ("kv_cache", "sampling_buffers",
                                                                           "merged_weights"))
