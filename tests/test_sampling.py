"""The sampler: the filtered distribution against transformers' own logits warpers and hand-computed
probabilities, and the row-dropping decoder against model.generate (greedy, same tokens)."""

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from grpo_lib.sampling import (decode, eos_token_ids, filtered_scores, generate_completions, next_tokens,
                               sample_groups, shared_prompt_cache, tokenize_prompts)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, None, 0.9), (1.3, 50, 1.0),
                                                     (0.9, 20, 0.8), (1.0, None, 0.3)])
def test_filtered_scores_match_the_warpers_of_generate(temperature, top_k, top_p):
    """generate() applies temperature, then top-k, then top-p; the kept tokens and their scores agree."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filtered_scores(logits, temperature, top_p, top_k)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got.softmax(-1), expected.softmax(-1))


def test_next_tokens_draws_from_the_nucleus_by_hand():
    """p = (0.5, 0.3, 0.15, 0.05): top_p=0.7 keeps the two most likely (0.5 + 0.3 >= 0.7),
    renormalised to (0.625, 0.375); temperature 2 alone gives p_i^(1/2) / sum_j p_j^(1/2)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().repeat(40000, 1)
    torch.manual_seed(0)
    freq = torch.bincount(next_tokens(logits, 1.0, top_p=0.7), minlength=4).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    freq = torch.bincount(next_tokens(logits, 2.0), minlength=4).float() / 40000
    torch.testing.assert_close(freq, p.sqrt() / p.sqrt().sum(), atol=0.01, rtol=0)
    assert next_tokens(logits[:3], None).tolist() == [0, 0, 0]  # greedy
    assert next_tokens(logits[:3], 0.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("V,block", [(10, 3), (1000, 64), (49152, 256)])
def test_draw_is_multinomial_in_distribution(V, block):
    """The two-level inverse-CDF draw: frequencies match probs (rows unnormalised, about a third of the tokens
    with zero mass, V not a multiple of the block), zero-mass tokens and padding are never drawn. The
    49k-vocabulary case puts the mass on a few tokens in different blocks so that 20k draws measure it."""
    from grpo_lib.sampling import draw

    torch.manual_seed(V)
    if V < 2000:
        mass = torch.rand(V) ** 4 * (torch.rand(V) > 0.33)
    else:
        mass = torch.zeros(V)
        mass[[5, 7000, 7001, V - 1]] = torch.tensor([0.2, 0.4, 0.1, 0.3])
    rows, calls = (200000, 1) if V < 2000 else (2000, 10)  # a [200000, 49152] batch would not fit in memory
    ids = torch.cat([draw(mass.repeat(rows, 1), block) for _ in range(calls)])
    n = rows * calls
    assert ids.max() < V and (mass[ids] > 0).all()
    freq = torch.bincount(ids, minlength=V).float() / n
    expected = mass / mass.sum()
    assert (freq - expected).abs().max() < 5 * (expected * (1 - expected) / n).sqrt().max() + 1e-4


def test_draw_never_leaves_the_support_when_rounding_reaches_the_total(monkeypatch):
    """u drawn at the very top of [0, total) (where float rounding can land) must still pick a token with mass."""
    from grpo_lib.sampling import draw

    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, **kw))  # u = total exactly
    probs = torch.tensor([[0.0, 0.7, 0.3, 0.0, 0.0]])
    assert draw(probs, block=2).tolist() == [2]


@pytest.mark.slow
@pytest.mark.parametrize("sync_every", [None, 3])
def test_decode_drops_finished_rows_and_writes_what_generate_writes(embedded_policy, sync_every):
    """Greedy, so both must produce the same tokens; prompts of different lengths (left padding) and an
    end token chosen so that rows end at different steps, which makes decode shrink its batch mid-way.
    sync_every=3 (as on a GPU): rows that end between synchronisations decode padding until the next one,
    and the output is still generate's, same width."""
    model, tokenizer = embedded_policy
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
             for q in ("Hi!", "What is 12 + 30? Explain briefly.", "Name three colours.", "Write a haiku about rain.",
                       "Why is the sky blue?")]
    ids, mask = tokenize_prompts(tokenizer, texts, "cpu")
    T = 16
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[:, ids.size(1):].tolist()

    def first_steps(tok):  # the step at which each row first writes tok (None: never)
        return {row.index(tok) if tok in row else None for row in free}

    end = max({t for row in free for t in row}, key=lambda tok: len(first_steps(tok)))
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    try:
        reference = generate_completions(model, tokenizer, ids, mask, T, do_sample=False, temperature=None,
                                         top_p=None, top_k=None)
        cache = shared_prompt_cache(model, ids, mask, 1)
        got = decode(model, ids, mask, cache, T, eos_token_ids(model, tokenizer), tokenizer.pad_token_id,
                     temperature=None, sync_every=sync_every)
    finally:
        model.generation_config.eos_token_id = saved
    lengths = reference[1].sum(1).tolist()
    assert len(set(lengths)) >= 3, lengths  # rows did end at different steps
    assert torch.equal(got, reference[0])  # same tokens, padding after each EOS, same width


def test_preallocated_cache_writes_in_place_and_keeps_the_chosen_rows():
    """The decoder's cache: each update writes into the buffer allocated at the start (same storage), the
    layer's keys/values are the prompt's followed by every update's (as a DynamicLayer's concatenation), and
    dropping rows keeps exactly those rows' keys/values."""
    from transformers.cache_utils import DynamicCache

    from grpo_lib.sampling import preallocated_cache

    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(4, 2, 5, 3, generator=g), torch.randn(4, 2, 5, 3, generator=g)  # [N, heads, S, d]
    cache = preallocated_cache(DynamicCache([(k0, v0)]), new_tokens=3)
    layer = cache.layers[0]
    storage = layer.keys.untyped_storage().data_ptr()
    k1, v1 = torch.randn(4, 2, 1, 3, generator=g), torch.randn(4, 2, 1, 3, generator=g)
    keys, values = cache.update(k1, v1, 0)
    assert torch.equal(keys, torch.cat([k0, k1], 2)) and torch.equal(values, torch.cat([v0, v1], 2))
    assert cache.get_seq_length() == 6 and keys.untyped_storage().data_ptr() == storage
    cache.batch_select_indices(torch.tensor([1, 3]))
    k2, v2 = torch.randn(2, 2, 1, 3, generator=g), torch.randn(2, 2, 1, 3, generator=g)
    keys, values = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k0[[1, 3]], k1[[1, 3]], k2], 2))
    assert torch.equal(values, torch.cat([v0[[1, 3]], v1[[1, 3]], v2], 2))
    assert keys.untyped_storage().data_ptr() == storage
    cache.update(k2, v2, 0)
    with pytest.raises(RuntimeError, match="past the preallocated cache"):
        cache.update(k2, v2, 0)


def test_sample_groups_masks_and_truncation(tiny_model, tokenizer):
    torch.manual_seed(0)
    r = sample_groups(tiny_model, tokenizer, ["say a", "say something longer"], 3, 8, temperature=1.0)
    N, T = r.completion_ids.shape
    assert N == 6 and T <= 8 and r.prompt_ids.size(0) == 2
    eos = set(eos_token_ids(tiny_model, tokenizer))
    for ids, m, trunc in zip(r.completion_ids.tolist(), r.completion_mask.tolist(), r.truncated.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (T - n)
        assert trunc == (not any(t in eos for t in ids[:n]))
        assert trunc or ids[n - 1] in eos
        assert all(t == tokenizer.pad_token_id for t in ids[n:])


def test_merged_adapters_sample_the_lora_policy_and_restore_the_weights(tiny_peft_model, tokenizer):
    """Sampling with LoRA merged into the base weights (one matmul per layer) is the same policy: the same
    logits up to float rounding, the same draws from the same seed; afterwards the base weights are the
    original tensors, bit for bit, and the adapters are back on."""
    from grpo_lib.models import merged_adapters
    from grpo_lib.sampling import sample_groups

    model = tiny_peft_model
    ids = torch.randint(0, 1000, (3, 7))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with merged_adapters(model) as merged:
            fused = merged(input_ids=ids).logits
        after = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, base, atol=1e-3), "the adapters change the policy"
    assert torch.equal(after, plain) and all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nyes?<|im_end|>\n"]
    torch.manual_seed(4)
    a = sample_groups(model, tokenizer, prompts, 3, 8, merge_adapters=True)
    torch.manual_seed(4)
    b = sample_groups(model, tokenizer, prompts, 3, 8, merge_adapters=False)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_nothing_is_merged_into_4bit_weights(tmp_path, tokenizer):
    from grpo_lib.models import load_policy, mergeable_lora_layers
    from tests.conftest import make_tiny_llama

    make_tiny_llama(len(tokenizer), hidden=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_policy(str(tmp_path), load_in_4bit=True, lora_r=4, device="cpu")
    assert mergeable_lora_layers(model) == []  # sampling runs the adapters on the nf4 base as they are
    plain, _ = load_policy(str(tmp_path), load_in_4bit=False, lora_r=4, device="cpu")
    assert len(mergeable_lora_layers(plain)) == 2 * 7  # every linear of both decoder layers
