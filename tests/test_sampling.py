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


@pytest.mark.slow
def test_decode_drops_finished_rows_and_writes_what_generate_writes(embedded_policy):
    """Greedy, so both must produce the same tokens; prompts of different lengths (left padding) and an
    end token chosen so that rows end at different steps, which makes decode shrink its batch mid-way."""
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
                     temperature=None)
    finally:
        model.generation_config.eos_token_id = saved
    lengths = reference[1].sum(1).tolist()
    assert len(set(lengths)) >= 3, lengths  # rows did end at different steps
    assert torch.equal(got, reference[0])  # same tokens, padding after each EOS, same width


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
