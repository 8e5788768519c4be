"""Model loading: nf4 4-bit + LoRA on CPU, the reference as adapters-off, the embedded model cache."""

import pytest
import torch

from grpo_lib.models import compute_dtype, embedded_model_path, load_policy, reference_mode
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(len(tokenizer), hidden=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def lora_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    loss = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, loss.item()


def test_nf4_lora_gradients_equal_dequantised_model(tiny_checkpoint):
    """QLoRA on CPU: the LoRA gradients through nf4 weights equal those through the same weights
    dequantised to fp32. bitsandbytes' CPU kernel multiplies in bf16 (quant_state.dtype), so they
    agree to ~0.5% in norm, not bit for bit; a broken quantised backward would be off by ~100%."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    q_model, _ = load_policy(tiny_checkpoint, load_in_4bit=True, lora_r=4, device="cpu")
    four_bit = [m for m in q_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_type == "nf4" for m in four_bit)

    d_model, _ = load_policy(tiny_checkpoint, load_in_4bit=False, lora_r=4, device="cpu")
    d_named = dict(d_model.named_modules())
    with torch.no_grad():
        for name, m in q_model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                d_named[name].weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state).float())
        torch.manual_seed(0)
        q_lora = {n: p for n, p in q_model.named_parameters() if "lora_" in n}
        for n, p in d_model.named_parameters():
            if "lora_" in n:  # same random (non-zero) adapters on both
                p.copy_(torch.randn_like(p) * 0.05)
                q_lora[n].copy_(p)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    g_q, loss_q = lora_grads(q_model, ids)
    g_d, loss_d = lora_grads(d_model, ids)
    assert loss_q == pytest.approx(loss_d, rel=1e-4)
    assert set(g_q) == set(g_d) and len(g_q) > 0
    for n in g_q:
        rel = ((g_q[n] - g_d[n]).norm() / g_d[n].norm()).item()
        assert rel < 2e-2, f"{n}: relative gradient error {rel:.4f}"


def test_reference_is_adapters_off(tiny_checkpoint):
    model, _ = load_policy(tiny_checkpoint, lora_r=4, device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)  # adapters now change the output
        ids = torch.tensor([[1, 2, 3, 4]])
        adapted = model(input_ids=ids).logits
        with reference_mode(model) as ref:
            reference = ref(input_ids=ids).logits
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)(input_ids=ids).logits
    torch.testing.assert_close(reference, plain)
    assert not torch.allclose(adapted, plain)


def test_full_model_needs_explicit_reference(tiny_checkpoint):
    model, _ = load_policy(tiny_checkpoint, lora_r=0, device="cpu")
    with pytest.raises(ValueError, match="ref_model"):
        with reference_mode(model):
            pass


def test_compute_dtype_on_cpu():
    assert compute_dtype("cpu") == torch.float32


@pytest.mark.parametrize("major,expected,fp16", [(7, torch.float16, True), (8, torch.bfloat16, False)])
def test_t4_computes_in_fp16_although_torch_can_emulate_bf16(monkeypatch, major, expected, fp16):
    """A T4 is compute capability 7.5: torch.cuda.is_bf16_supported() says True there (it can emulate
    bf16 by creating a tensor), but bf16 matmuls are emulated and slow: fp16 + loss scaling it is.
    The GPU is faked at torch's device-query level, so torch's own decision logic runs."""
    from types import SimpleNamespace

    from grpo_lib.trl_bridge import runtime_fields

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(major=major, minor=5))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert torch.cuda.is_bf16_supported()  # torch's default answer: yes, even on the T4
    assert compute_dtype("cuda") == expected
    assert runtime_fields("out")["fp16"] is fp16 and runtime_fields("out")["bf16"] is not fp16


@pytest.mark.slow
def test_embedded_model_is_cached_and_speaks(embedded_policy):
    path = embedded_model_path()
    mtime = (path / "config.json").stat().st_mtime
    assert embedded_model_path() == path and (path / "config.json").stat().st_mtime == mtime  # not reconverted
    model, tok = embedded_policy
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.size(1):])


def test_4bit_layers_with_a_bias_train_after_sampling_on_cpu(tmp_path, tokenizer):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first no-grad eval forward
    (sampling); without models.keep_4bit_weights_trainable_on_cpu, the next forward with gradients fails in
    layers with a bias (Qwen2's q/k/v) on CPUs with AVX512-BF16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_lib.logprobs import per_token_logps

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_policy(str(tmp_path), load_in_4bit=True, lora_r=4, device="cpu")
    assert any(getattr(m, "bias", None) is not None for m in model.modules() if type(m).__name__ == "Linear4bit")
    ids = torch.randint(0, 1000, (2, 6))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what sampling does first
    model.train()
    logps = per_token_logps(model, ids, torch.ones_like(ids), 3)
    logps.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_lora_initialisation_is_seeded_and_leaves_the_global_rng_alone(tiny_checkpoint):
    """LoRA's A matrices are random (B starts at 0): two loads with the same seed give the same adapters, so a
    run is reproducible from its config; another seed gives others; the caller's random stream is untouched."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, _ = load_policy(tiny_checkpoint, lora_r=4, device="cpu", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = load_policy(tiny_checkpoint, lora_r=4, device="cpu", seed=0)
    c, _ = load_policy(tiny_checkpoint, lora_r=4, device="cpu", seed=1)
    lora = lambda m: [p for n, p in m.named_parameters() if "lora_A" in n]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(lora(a), lora(b)))
    assert not all(torch.equal(x, y) for x, y in zip(lora(a), lora(c)))
