"""fp16 failures are loud: inf/NaN logits stop the sampler with the step and the fix; the run log records the
loss scale and each step the GradScaler skipped; k skipped steps in a row stop the run; cuBLAS is asked for
fp32 accumulation, which is what tests/fp16_matmuls.py simulates."""

import math

import pytest
import torch

from grpo_lib import checkpoint, models, runlog
from grpo_lib.config import ConfigError, GRPOConfig
from grpo_lib.sampling import NonFiniteLogitsError, sample_groups
from grpo_lib.trainer import GRPOTrainer
from tests.conftest import add_random_lora, make_tiny_llama
from tests.fp16_matmuls import Fp16MatmulsInFloat32

PROMPTS = [{"prompt": f"<|im_start|>user\nSay {w}<|im_end|>\n<|im_start|>assistant\n"} for w in ("yes", "no", "ok")]
INIT_SCALE = 2.0 ** 16  # torch.amp.GradScaler's default init_scale; backoff_factor 0.5


def vowel_share(completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def tiny(tokenizer, dtype=torch.float32):
    model = make_tiny_llama(len(tokenizer)).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ----------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------

def test_fp16_overflow_in_the_logits_stops_the_sampler_at_the_first_step(tokenizer):
    """A final norm of weight 2^15 and 10x the (tied) head put some fp16 logits past 65504: an overflow."""
    model = tiny(tokenizer, torch.float16)
    with torch.no_grad():
        model.model.norm.weight.fill_(2.0 ** 15)
        model.lm_head.weight.mul_(10)
        logits = model(**tokenizer(PROMPTS[0]["prompt"], return_tensors="pt")).logits[0, -1]
    assert logits.isinf().any()  # the poison overflows as fp16 does on a GPU
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLogitsError) as err:
        sample_groups(model, tokenizer, [PROMPTS[0]["prompt"]], 2, 8)
    msg = str(err.value)
    assert "decoding step 1 (completion token 1) in 2 of 2 rows (completions [0, 1])" in msg
    assert "dtype float16" in msg and "+inf" in msg and "dtype='float32'" in msg and "dtype='bfloat16'" in msg


def test_nan_logits_of_one_completion_name_its_row_and_step(tokenizer):
    """NaN in row 1 of the 3rd decoding step only: the head's 1st call is the prompt's prefill, then one a step."""
    model = tiny(tokenizer)
    V = model.config.vocab_size
    calls = []

    def poison(module, inputs, output):
        calls.append(output.size(0))
        if len(calls) == 4:
            output = output.clone()
            output[1] = float("nan")
        return output

    model.lm_head.register_forward_hook(poison)
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLogitsError,
                       match=rf"decoding step 3 \(completion token 3\) in 1 of 2 rows \(completions \[1\]\): "
                             rf"{V} NaN of {2 * V} values, dtype float32"):
        sample_groups(model, tokenizer, [PROMPTS[0]["prompt"]], 2, 8)
    assert calls == [1, 2, 2, 2]  # prefill of 1 prompt, then 2 completions: stopped at the 3rd step


def test_finite_logits_sample_as_before(tokenizer):
    model = tiny(tokenizer)
    torch.manual_seed(0)
    rollout = sample_groups(model, tokenizer, [PROMPTS[0]["prompt"]], 2, 8)
    assert rollout.completion_ids.shape == (2, 8)  # a random model writes no EOS in 8 tokens


# ----------------------------------------------------------------------------------------------
# the loss scale, skipped steps and the stop
# ----------------------------------------------------------------------------------------------

def fp16_trainer(tokenizer, poisoned_steps=(), run_dir=None, **kw):
    """An fp16 base + fp32 LoRA trainer (GradScaler on, on the CPU). In the steps `poisoned_steps` (1-based)
    every LoRA gradient is +inf, as after an fp16 overflow in backward."""
    model = add_random_lora(tiny(tokenizer, torch.float16))
    config = GRPOConfig(**{**dict(model="tiny", load_in_4bit=False, lora_r=4, gradient_checkpointing=False,
                                  prompts_per_step=1, num_generations=2, max_completion_length=4, max_steps=5,
                                  save_steps=0, reward_funcs=("format",), max_prompt_length=64, seed=1), **kw})
    trainer = GRPOTrainer(model, tokenizer, [vowel_share], config, PROMPTS, run_dir=run_dir)
    for p in models.trainable_parameters(model):
        p.register_hook(lambda g: torch.full_like(g, math.inf) if trainer.step_count + 1 in poisoned_steps else g)
    return trainer


def lora_weights(trainer):
    return [p.detach().clone() for p in models.trainable_parameters(trainer.model)]


def test_skipped_steps_are_logged_with_the_scale_and_change_nothing(tokenizer):
    trainer = fp16_trainer(tokenizer, poisoned_steps=(1, 2, 4, 5), max_skipped_steps=3)
    assert trainer.scaler.is_enabled()
    weights, changed, records = lora_weights(trainer), [], []
    with Fp16MatmulsInFloat32():
        for _ in range(5):
            records.append(trainer.step())
            now = lora_weights(trainer)
            changed.append(any(not torch.equal(a, b) for a, b in zip(weights, now)))
            weights = now
    # each skip halves the scale; the clean step 3 keeps it (growth only after 2000 clean steps)
    assert [r.metrics["amp/loss_scale"] for r in records] == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 4,
                                                              INIT_SCALE / 4, INIT_SCALE / 8]
    assert [r.metrics["amp/step_skipped"] for r in records] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert changed == [False, False, True, False, False]  # a skipped step leaves the adapters as they were
    assert trainer.scheduler.last_epoch == 1  # and the learning-rate schedule: only step 3 advanced it
    assert math.isinf(records[0].metrics["grad_norm"]) and math.isfinite(records[2].metrics["grad_norm"])


def test_k_skipped_steps_in_a_row_stop_the_run_with_the_reason(tokenizer, tmp_path):
    trainer = fp16_trainer(tokenizer, poisoned_steps=(1, 2, 3, 4, 5), run_dir=tmp_path, max_steps=5,
                           max_skipped_steps=3)
    with Fp16MatmulsInFloat32():
        records = trainer.train()
    assert [r.step for r in records] == [1, 2, 3]
    assert trainer.stop_reason.startswith("fp16 overflow: the loss scaler skipped the optimiser step 3 steps in a "
                                          "row (inf/NaN gradients, max_skipped_steps=3; loss scale now 8192")
    assert "stopped after step 3 of 5" in trainer.stop_reason and "dtype='float32'" in trainer.stop_reason
    logged = [e.metrics for e in runlog.load_run_log(tmp_path)]
    assert [m["amp/step_skipped"] for m in logged] == [1.0, 1.0, 1.0]
    assert [m["amp/loss_scale"] for m in logged] == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 4]
    state = torch.load(checkpoint.checkpoint_dirs(tmp_path)[-1] / checkpoint.STATE_NAME, weights_only=False)
    assert state["skipped_steps"] == 3 and state["scaler"]["scale"] == INIT_SCALE / 8


def test_max_skipped_steps_0_never_stops(tokenizer):
    trainer = fp16_trainer(tokenizer, poisoned_steps=(1, 2, 3), max_steps=3, max_skipped_steps=0)
    with Fp16MatmulsInFloat32():
        records = trainer.train()
    assert len(records) == 3 and trainer.stop_reason is None and trainer.skipped_steps == 3


def test_without_loss_scaling_the_scale_is_1_and_nothing_is_skipped(tokenizer):
    model = add_random_lora(tiny(tokenizer))
    config = GRPOConfig(model="tiny", load_in_4bit=False, lora_r=4, gradient_checkpointing=False, prompts_per_step=1,
                        num_generations=2, max_completion_length=4, reward_funcs=("format",), max_prompt_length=64)
    record = GRPOTrainer(model, tokenizer, [vowel_share], config, PROMPTS).step()
    assert record.metrics["amp/loss_scale"] == 1.0 and record.metrics["amp/step_skipped"] == 0.0


def test_max_skipped_steps_is_validated():
    with pytest.raises(ConfigError, match="max_skipped_steps=-1 is invalid: must be >= 0"):
        GRPOConfig(max_skipped_steps=-1)


# ----------------------------------------------------------------------------------------------
# what cuBLAS is asked for, and what the CPU simulation computes
# ----------------------------------------------------------------------------------------------

def test_fp16_on_cuda_turns_reduced_precision_reductions_off():
    flags = torch.backends.cuda.matmul
    before = flags.allow_fp16_reduced_precision_reduction
    try:
        flags.allow_fp16_reduced_precision_reduction = True  # torch's default
        assert not models.fp16_matmuls_accumulate_in_fp32(torch.bfloat16, "cuda")
        assert not models.fp16_matmuls_accumulate_in_fp32(torch.float16, "cpu")
        assert flags.allow_fp16_reduced_precision_reduction  # untouched by bf16 or a CPU model
        assert models.fp16_matmuls_accumulate_in_fp32(torch.float16, "cuda:0")
        assert flags.allow_fp16_reduced_precision_reduction is False
    finally:
        flags.allow_fp16_reduced_precision_reduction = before


def test_the_simulation_accumulates_in_fp32_and_rounds_once():
    """Partial sums 60000 + 60000 overflow fp16 (> 65504); accumulated in fp32 the product is exactly 16.
    An fp16 accumulator (what reduced-precision reductions allow) would give inf."""
    a = torch.tensor([[60000.0, 60000.0, -60000.0, -60000.0, 16.0]], dtype=torch.float16)
    b = torch.ones(5, 1, dtype=torch.float16)
    with Fp16MatmulsInFloat32():
        out = a @ b
    assert out.dtype == torch.float16 and out.item() == 16.0
    fp16_running_sum = torch.tensor(0.0, dtype=torch.float16)
    for x in a[0]:
        fp16_running_sum = fp16_running_sum + x
    assert fp16_running_sum.isinf() or fp16_running_sum.isnan()
