"""Per-token log-probs (and entropies): the chunked, completion-only, shared-prompt paths equal the
straightforward full-vocabulary log-softmax (and Categorical entropy), in values and in LoRA gradients."""

import math

import pytest
import torch

from grpo_lib.logprobs import per_token_logps, rollout_logps, shared_prompt_logps
from grpo_lib.loss import grpo_loss
from grpo_lib.sampling import Rollout, completion_mask_from_eos, tokenize_prompts


def full_logsoftmax_logps(model, input_ids, attention_mask, T, temperature=1.0):
    """The straightforward way: all logits, log_softmax over the vocabulary, gather."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits  # [N, L, V]
    logps = torch.log_softmax(logits[:, -T - 1:-1].float() / temperature, dim=-1)
    return logps.gather(-1, input_ids[:, -T:, None]).squeeze(-1)


def make_rollout(tokenizer, G=3, T=6, seed=0):
    prompts = ["<|im_start|>user\nWhich is larger, 12 or 40?<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, "cpu")  # left-padded: lengths differ
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (2 * G, T), generator=g)
    ids[0, 2] = tokenizer.eos_token_id  # one short completion, the others truncated or ending later
    ids[4, 4] = tokenizer.eos_token_id
    mask, truncated = completion_mask_from_eos(ids, [tokenizer.eos_token_id])
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollout(prompts, prompt_ids, prompt_mask, ids, mask, [""] * 2 * G, truncated, G)


def full_inputs(r: Rollout):
    """Each completion after its own copy of its prompt: input_ids, attention_mask [N, P + T]."""
    return (torch.cat([r.prompt_ids[r.group_index], r.completion_ids], 1),
            torch.cat([r.prompt_mask[r.group_index], r.completion_mask], 1))


def test_per_token_logps_equals_full_log_softmax(tiny_peft_model, tokenizer):
    r = make_rollout(tokenizer)
    idx = torch.arange(6)
    input_ids, attn = full_inputs(r)
    with torch.no_grad():
        expected = full_logsoftmax_logps(tiny_peft_model, input_ids, attn, 6, temperature=0.7)
        got = per_token_logps(tiny_peft_model, input_ids, attn, 6, temperature=0.7, chunk_size=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    m = r.completion_mask.bool()
    with torch.no_grad():
        for share in (True, False):
            got = rollout_logps(tiny_peft_model, r, idx, 0.7, chunk_size=4, share_prompt=share)
            torch.testing.assert_close(got[m], expected[m], rtol=1e-5, atol=1e-5)


def test_shared_prompt_gradients_equal_plain(tiny_peft_model, tokenizer):
    """The optimised path (shared prompt, chunked head, trimmed padding) gives the same loss and LoRA
    gradients as the straightforward path."""
    r = make_rollout(tokenizer)
    idx = torch.arange(6)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2])
    params = [p for p in tiny_peft_model.parameters() if p.requires_grad]

    def loss_and_grads(compute_logps):
        logps = compute_logps()
        ref = logps.detach() - 0.1
        loss, _ = grpo_loss(logps, None, ref, adv, r.completion_mask, beta=0.04)
        return loss.detach(), torch.autograd.grad(loss, params)

    input_ids = torch.cat([r.prompt_ids[r.group_index], r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask[r.group_index], r.completion_mask], 1)
    l0, g0 = loss_and_grads(lambda: full_logsoftmax_logps(tiny_peft_model, input_ids, attn, 6))
    l1, g1 = loss_and_grads(lambda: rollout_logps(tiny_peft_model, r, idx, 1.0, 4, share_prompt=True))
    l2, g2 = loss_and_grads(lambda: rollout_logps(tiny_peft_model, r, idx, 1.0, 4, share_prompt=False))
    for loss, grads in ((l1, g1), (l2, g2)):
        torch.testing.assert_close(loss, l0, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g0)


def test_shared_prompt_logps_single_token_completion(tiny_model, tokenizer):
    prompt = torch.tensor([5, 6, 7, 8])
    comp = torch.tensor([[9], [10]])
    with torch.no_grad():
        got = shared_prompt_logps(tiny_model, prompt[None], torch.ones(1, 4, dtype=torch.long), comp,
                                  torch.zeros(2, dtype=torch.long))
        full = torch.log_softmax(tiny_model(input_ids=prompt[None]).logits[0, -1], -1)
    torch.testing.assert_close(got[:, 0], full[[9, 10]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_subset_indices(tiny_peft_model, tokenizer, share):
    """A micro-batch of some completions gets the same values as the full batch has for them."""
    r = make_rollout(tokenizer)
    with torch.no_grad():
        full = rollout_logps(tiny_peft_model, r, torch.arange(6), share_prompt=share)
        part = rollout_logps(tiny_peft_model, r, torch.tensor([2, 3]), share_prompt=share)
        short = rollout_logps(tiny_peft_model, r, torch.tensor([0]), share_prompt=share)
    m = r.completion_mask[[2, 3]].bool()
    torch.testing.assert_close(part[m], full[[2, 3]][m], rtol=1e-5, atol=1e-5)
    # completion 0 ends with EOS at position 2: no compute past it, zeros in the padding columns
    torch.testing.assert_close(short[0, :3], full[0, :3], rtol=1e-5, atol=1e-5)
    assert short.shape == (1, 6) and (short[0, 3:] == 0).all()


# ----------------------------------------------------------------------------------------------
# entropies from the same chunked pass
# ----------------------------------------------------------------------------------------------


def full_entropies(model, input_ids, attention_mask, T, temperature=1.0):
    """The straightforward way: all logits, Categorical(logits / tau).entropy() over the vocabulary."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits  # [N, L, V]
    return torch.distributions.Categorical(logits=logits[:, -T - 1:-1].float() / temperature).entropy()


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 4096])
def test_entropies_equal_the_full_categorical_entropy(tiny_peft_model, tokenizer, grad, chunk_size):
    r = make_rollout(tokenizer)
    idx = torch.arange(6)
    input_ids, attn = full_inputs(r)
    with torch.no_grad():
        expected = full_entropies(tiny_peft_model, input_ids, attn, 6, temperature=0.7)
        expected_logps = full_logsoftmax_logps(tiny_peft_model, input_ids, attn, 6, temperature=0.7)
    m = r.completion_mask.bool()
    with torch.set_grad_enabled(grad):
        logps, ent = per_token_logps(tiny_peft_model, input_ids, attn, 6, 0.7, chunk_size, with_entropy=True)
        assert logps.requires_grad == grad and not ent.requires_grad  # entropies are detached
        torch.testing.assert_close(ent, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logps.detach(), expected_logps, rtol=1e-5, atol=1e-5)
        for share in (True, False):
            logps, ent = rollout_logps(tiny_peft_model, r, idx, 0.7, chunk_size, share_prompt=share, with_entropy=True)
            assert not ent.requires_grad and ent.shape == logps.shape == (6, 6)
            torch.testing.assert_close(ent[m], expected[m], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logps.detach()[m], expected_logps[m], rtol=1e-5, atol=1e-5)
    assert (ent[m] > 0).all() and (ent[m] <= math.log(len(tokenizer)) + 1e-4).all()  # 0 < H <= log V


def test_entropy_costs_no_second_pass_and_changes_no_gradient(tiny_peft_model, tokenizer, monkeypatch):
    """The entropy is taken from the logits block already in memory, once per chunk in forward: the
    checkpointed recompute in backward stops before it. The log-probs' gradients are those without it."""
    import grpo_lib.logprobs as lp

    r = make_rollout(tokenizer)
    idx = torch.arange(6)
    params = [p for p in tiny_peft_model.parameters() if p.requires_grad]
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.9, -1.2])
    plain = rollout_logps(tiny_peft_model, r, idx, 1.0, 4, share_prompt=False)
    g0 = torch.autograd.grad(grpo_loss(plain, None, None, adv, r.completion_mask, beta=0.0)[0], params)
    calls = []
    original = lp._chunk_entropy
    monkeypatch.setattr(lp, "_chunk_entropy", lambda *a: calls.append(1) or original(*a))
    logps, _ = rollout_logps(tiny_peft_model, r, idx, 1.0, 4, share_prompt=False, with_entropy=True)
    forward_calls = len(calls)
    g1 = torch.autograd.grad(grpo_loss(logps, None, None, adv, r.completion_mask, beta=0.0)[0], params)
    width = int(r.completion_mask.sum(1).max())
    assert forward_calls == math.ceil(6 * width / 4)  # one per [chunk, vocab] block
    assert len(calls) == forward_calls  # none in backward
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)


def test_length_buckets_by_hand():
    """Rows sorted longest first; a run costs rows x its longest + the overhead. Lengths 30, 28, 5, 4, 4 with
    overhead 10: one run costs 5 x 30 + 10 = 160; {30, 28} + {5, 4, 4} costs 60 + 10 + 15 + 10 = 95, the least."""
    from grpo_lib.logprobs import length_buckets

    assert length_buckets([4, 30, 5, 28, 4], overhead=10) == [[1, 3], [2, 0, 4]]
    assert length_buckets([4, 30, 5, 28, 4], overhead=1000) == [[1, 3, 2, 0, 4]]  # a forward costs too much
    assert length_buckets([7, 7, 7], overhead=1) == [[0, 1, 2]]  # equal lengths: splitting saves nothing
    assert sorted(r for run in length_buckets([3, 9, 1, 9, 2, 8], overhead=2) for r in run) == list(range(6))


def test_length_buckets_give_the_same_log_probs_and_gradients(tiny_peft_model, tokenizer):
    """A group whose completions end at very different lengths, run in length_buckets (each run on its own copy
    of the prompt's KV cache, trimmed to its longest) vs as one padded batch: the same log-probs on every real
    token, the same LoRA gradients of a masked loss, 0 past the longest of each run."""
    from grpo_lib.logprobs import length_buckets

    prompt = tokenize_prompts(tokenizer, ["<|im_start|>user\nWhich is larger, 12 or 40?<|im_end|>\n"], "cpu")[0][0]
    torch.manual_seed(1)
    ids = torch.randint(100, 1000, (6, 12))
    lengths = [12, 2, 11, 3, 1, 12]
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).float()
    assert len(length_buckets(lengths)) > 1, "the lengths must split, or this tests nothing"
    results = {}
    for bucketed in (True, False):
        tiny_peft_model.zero_grad()
        logps = shared_prompt_logps(tiny_peft_model, prompt[None], torch.ones_like(prompt)[None], ids,
                                    torch.zeros(6, dtype=torch.long), lengths=lengths if bucketed else None)
        (logps * mask).sum().backward()
        grads = [p.grad.clone() for p in tiny_peft_model.parameters() if p.requires_grad]
        results[bucketed] = (logps, grads)
    torch.testing.assert_close(results[True][0] * mask, results[False][0] * mask, rtol=1e-5, atol=1e-6)
    assert (results[True][0][:, 3:] == 0)[[1, 3, 4]].all(), "the short rows' run stops at its longest, 3"
    for a, b in zip(results[True][1], results[False][1]):
        # float32 sums over a different padded length round differently (1.2e-6 seen in CI); a real bucketing
        # bug moves gradients by their own size
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-6)


def test_several_prompts_of_different_lengths_in_one_shared_batch(tiny_peft_model, tokenizer):
    """Completions of two prompts of different lengths (left padding, attention mask) in one shared-prompt
    batch, rows interleaved: the same log-probs as each row's prompt + completion through the full model."""
    prompts = ["<|im_start|>user\nWhich is larger, 12 or 40? Think.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, "cpu")  # [2, P], the second left-padded
    assert not prompt_mask.all()
    torch.manual_seed(2)
    ids = torch.randint(100, 1000, (5, 7))
    groups = torch.tensor([1, 0, 1, 0, 0])
    lengths = [7, 3, 2, 7, 5]
    with torch.no_grad():
        got = shared_prompt_logps(tiny_peft_model, prompt_ids, prompt_mask, ids, groups, lengths)
        for i, g in enumerate(groups.tolist()):
            real = prompt_ids[g][prompt_mask[g].bool()]
            full = full_logsoftmax_logps(tiny_peft_model, torch.cat([real, ids[i]])[None],
                                         torch.ones(1, len(real) + 7, dtype=torch.long), 7)[0]
            torch.testing.assert_close(got[i, :lengths[i]], full[:lengths[i]], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the shared-prompt path under gradient checkpointing; the output head in the compute dtype
# ----------------------------------------------------------------------------------------------


def attention_batches(model, run):
    """The (batch, length) of every input layer 0's attention sees while `run()` runs, replays in backward
    included (a submodule's hooks run inside the checkpoint)."""
    seen = []
    attn = model.get_base_model().model.layers[0].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["hidden_states"].shape[:2])),
                                            with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen


def test_shared_prompt_path_under_checkpointing_equals_it_without(tokenizer):
    """Gradient checkpointing on the shared-prompt path: the same log-probs and LoRA gradients as without it,
    and as the full log-softmax over each completion after its own prompt. Each prompt still runs once (layer
    0's attention sees the 2 prompts as one batch of 2), and every layer call is replayed once in backward."""
    from grpo_lib.models import enable_gradient_checkpointing
    from tests.conftest import add_random_lora, make_tiny_llama

    r = make_rollout(tokenizer)
    idx, weights = torch.arange(6), torch.linspace(-1, 1, 36).reshape(6, 6)
    results = {}
    for ckpt in (False, True):
        model = add_random_lora(make_tiny_llama(len(tokenizer)))
        if ckpt:
            enable_gradient_checkpointing(model.get_base_model())
        model.train()  # transformers checkpoints only in training mode
        params = [p for p in model.parameters() if p.requires_grad]

        def run():
            logps = rollout_logps(model, r, idx, 0.7, chunk_size=4, share_prompt=True)
            return logps, torch.autograd.grad((logps * weights * r.completion_mask).sum(), params)

        (logps, grads), seen = attention_batches(model, run)
        results[ckpt] = logps.detach(), grads, seen
        if not ckpt:
            input_ids, attn = full_inputs(r)
            with torch.no_grad():
                expected = full_logsoftmax_logps(model, input_ids, attn, 6, temperature=0.7)
            m = r.completion_mask.bool()
            torch.testing.assert_close(logps.detach()[m], expected[m], rtol=1e-5, atol=1e-5)
    (plain, g_plain, seen_plain), (ckpt, g_ckpt, seen_ckpt) = results[False], results[True]
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in g_plain)
    assert seen_plain[0][0] == 2  # the 2 prompts in one batch, then their completions on the cache
    assert sorted(seen_ckpt) == sorted(seen_plain + seen_plain)  # each call once more, in backward


def test_reentrant_checkpointing_is_refused_on_the_shared_path(tiny_peft_model, tokenizer):
    """Reentrant checkpointing would not send gradients through the prompt's cache: a clear error, not silently
    wrong gradients."""
    tiny_peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tiny_peft_model.train()
    with pytest.raises(ValueError, match="non-reentrant"):
        rollout_logps(tiny_peft_model, make_rollout(tokenizer), torch.arange(6), share_prompt=True)
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in tiny_peft_model.modules())  # nothing left set


def test_head_in_a_lower_dtype_matches_the_fp32_head_and_passes_gradients(tiny_model):
    """token_logps_from_hidden with dtype=fp16: z = fp32(W_fp16 h_fp16), log-softmax in fp32. Against the fp32
    head: log-probs within fp16's rounding of the inputs (relative 2^-11 on each factor of every product),
    gradients to the hidden states likewise; the head's weight stays fp32 and gets no gradient."""
    from grpo_lib.logprobs import output_head, token_logps_from_hidden

    head = output_head(tiny_model)
    head.weight.requires_grad_(False)  # frozen, as under LoRA
    g = torch.Generator().manual_seed(0)
    hidden = (3 * torch.randn(2, 5, head.in_features, generator=g)).requires_grad_()
    targets = torch.randint(0, head.out_features, (2, 5), generator=g)
    exact = token_logps_from_hidden(head, hidden, targets, 0.7, chunk_size=3)
    (g_exact,) = torch.autograd.grad(exact.sum(), hidden)
    half = token_logps_from_hidden(head, hidden, targets, 0.7, chunk_size=3, dtype=torch.float16)
    (g_half,) = torch.autograd.grad(half.sum(), hidden)
    assert half.dtype == torch.float32 and head.weight.dtype == torch.float32
    logits = hidden.detach() @ head.weight.T  # [2, 5, V] the exact logits, for the size of their rounding
    tol = 4 * 2.0**-11 * (hidden.detach().abs() @ head.weight.abs().T).max().item() / 0.7
    assert 0 < (half - exact).abs().max() < tol, ((half - exact).abs().max(), tol)
    assert logits.abs().max() > 1  # logits large enough for fp16 rounding to show
    torch.testing.assert_close(g_half, g_exact, rtol=1e-2, atol=1e-3)
    assert head.weight.grad is None


def test_colab_t4_path_on_cpu_nf4_fp16_checkpointing(tmp_path, tokenizer):
    """The colab-t4 code path (nf4 base, fp16 compute, LoRA, gradient checkpointing) on the CPU with fp16 matmuls
    as a GPU computes them: the head runs from an fp16 copy of peft's fp32 head, and the shared-prompt path
    under checkpointing gives the plain path's log-probs and LoRA gradients (within fp16 rounding)."""
    from grpo_lib.logprobs import head_dtype, output_head
    from grpo_lib.models import load_policy
    from tests.conftest import make_tiny_llama
    from tests.fp16_matmuls import Fp16MatmulsInFloat32

    make_tiny_llama(len(tokenizer), hidden=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_policy(str(tmp_path), load_in_4bit=True, lora_r=4, gradient_checkpointing=True, device="cpu",
                           dtype=torch.float16)
    assert output_head(model).weight.dtype == torch.float32 and head_dtype(model) == torch.float16
    for name, p in model.named_parameters():  # random B: the adapters change the outputs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    r = make_rollout(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    out = {}
    with Fp16MatmulsInFloat32():
        for share in (True, False):
            logps = rollout_logps(model, r, torch.arange(6), 1.0, chunk_size=4, share_prompt=share)
            out[share] = logps.detach(), torch.autograd.grad((logps * r.completion_mask).sum(), params)
    m = r.completion_mask.bool()
    torch.testing.assert_close(out[True][0][m], out[False][0][m], rtol=0, atol=2e-2)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
    assert all(torch.isfinite(g).all() for g in out[True][1]) and any(g.abs().sum() > 0 for g in out[True][1])


@pytest.mark.parametrize("four_bit", [False, True])
def test_checkpointing_is_requested_non_reentrant_without_warnings(tmp_path, tokenizer, monkeypatch, four_bit):
    """load_policy asks torch's checkpoint for use_reentrant=False in every checkpointed layer (peft's kbit
    preparation would leave it to torch's reentrant default, with a warning), through transformers' current
    entry point (no deprecation FutureWarning); a training forward + backward warns about neither."""
    import warnings

    import transformers.modeling_utils

    from grpo_lib.logprobs import _checkpointed_layers, backbone
    from grpo_lib.models import load_policy
    from tests.conftest import make_tiny_llama

    calls = []
    real = transformers.modeling_utils.checkpoint

    def recording_checkpoint(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant", "not passed"))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", recording_checkpoint)
    make_tiny_llama(len(tokenizer), hidden=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_policy(str(tmp_path), load_in_4bit=four_bit, lora_r=4, gradient_checkpointing=True,
                               device="cpu")
        model.train()
        r = make_rollout(tokenizer)
        for share in (True, False):
            rollout_logps(model, r, torch.arange(6), share_prompt=share).sum().backward()
    layers = _checkpointed_layers(backbone(model))
    assert len(layers) == 2 and all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False}
                                    for m in layers)
    # 2 layers x (prompt + completion runs) on the shared path + 2 layers on the plain one, each once in forward
    assert len(calls) >= 6 and set(calls) == {False}
    about = [str(w.message) for w in caught if "reentrant" in str(w.message)
             or "gradient_checkpointing_enable" in str(w.message)]
    assert about == []
