"""Per-token log-probabilities of completions, without the full [N, T, vocab] logits tensor.

    log pi(o_t | q, o_<t) = z[o_t] / tau - logsumexp(z / tau)       z = lm_head(h_{t-1})
    H_t = -sum_v p_v log p_v = logsumexp(z / tau) - sum_v p_v z_v / tau      p = softmax(z / tau)

Only completion positions go through the output head, `chunk_size` positions at a time; with
gradients on, each chunk is recomputed in backward (activation checkpointing), so peak memory holds
one [chunk, vocab] block instead of N*T of them. The shared-prompt path runs a group's prompt
once and its G completions on top of the prompt's KV cache (`shared_prompt_logps`, several prompts in one
batch): the same numbers as the plain path (gradients flow through the cache into the prompt's activations)
for about 1/G of the prompt compute.

Completions are padded to the longest of their batch, and the positions after an EOS cost as much as real
ones. `length_buckets` splits a batch into runs of similar length, each padded only to its own longest
(rollout_logps does this per group): the same numbers, fewer positions through every layer.

With `with_entropy=True` each function also returns H_t, the entropy of the temperature-scaled policy,
detached, taken from the [chunk, vocab] block already in memory: no second pass over the vocabulary, and
none in backward (checkpointing's recompute stops at the last tensor autograd saves, before the entropy).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The transformer without its output head (LoRA layers, when present, are inside it)."""
    return _base(model).get_decoder()


def output_head(model):
    return _base(model).get_output_embeddings()


def _chunk_entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per row, H = logsumexp(z) - sum_v softmax(z)_v z_v; no gradient.  [c, V], [c] -> [c]"""
    with torch.no_grad():
        return lse - torch.softmax(logits, dim=-1).mul_(logits).sum(dim=-1)  # one [c, V] temporary


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = False):
    """hidden [c, H], targets [c] -> [c]: z[target] - logsumexp(z), z = head(hidden) / tau in fp32; with_entropy:
    (that, entropy [c]), the entropy computed after every tensor autograd saves, so that checkpointing's
    recompute in backward stops before it."""
    logits = head(hidden).float() / temperature  # [c, V]
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    return (logps, _chunk_entropy(logits, lse)) if with_entropy else logps


def token_logps_from_hidden(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                            chunk_size: int = 512, with_entropy: bool = False):
    """Log-probabilities of `targets` [N, T] given the hidden states that predict them [N, T, H];
    with_entropy: (log-probs, entropies [N, T] detached)."""
    N, T, H = hidden.shape
    flat_h, flat_t = hidden.reshape(N * T, H), targets.reshape(N * T)
    recompute = torch.is_grad_enabled() and flat_h.requires_grad
    chunks = []
    for start in range(0, N * T, chunk_size):
        h, t = flat_h[start:start + chunk_size], flat_t[start:start + chunk_size]
        if recompute:  # keep no [chunk, V] logits alive for backward: recompute them there
            out = checkpoint(_chunk_logps, head, h, t, temperature, with_entropy, use_reentrant=False)
        else:
            out = _chunk_logps(head, h, t, temperature, with_entropy)
        chunks.append(out if with_entropy else (out,))
    outs = tuple(torch.cat(parts).reshape(N, T) for parts in zip(*chunks))
    return outs if with_entropy else outs[0]


BUCKET_OVERHEAD_TOKENS = 24
"""A forward call's fixed cost (its Python and per-layer dispatch) in positions' worth of compute: a run of
similar lengths gets its own forward only when that saves more padded positions than this."""


def length_buckets(lengths: list[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices split into runs of similar length, longest first, each run to be padded only to its own
    longest: the split that minimises positions computed (rows x longest, per run) + overhead per run
    (dynamic programming over the rows sorted by length)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[i]: cost of order[:i]
    cut = [0] * (len(order) + 1)
    for i in range(1, len(order) + 1):
        for j in range(i):  # the last run is order[j:i], padded to the length of order[j]
            cost = best[j] + (i - j) * lengths[order[j]] + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    runs, i = [], len(order)
    while i > 0:
        runs.append(order[cut[i]:i])
        i = cut[i]
    return runs[::-1]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as generate() uses: [B, L] -> [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                    temperature: float = 1.0, chunk_size: int = 512, with_entropy: bool = False):
    """Log-probs of the last `logits_to_keep` tokens of each row.

    input_ids, attention_mask: [N, P + T] (prompt left-padded, completion right-padded); returns [N, T]
    with T = logits_to_keep (with_entropy: and the entropies [N, T]). Hidden state t predicts token t + 1,
    hence the shift by one.
    """
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions_from_mask(attention_mask), use_cache=False)
    hidden = out.last_hidden_state[:, -logits_to_keep - 1:-1]  # [N, T, H]
    return token_logps_from_hidden(output_head(model), hidden, input_ids[:, -logits_to_keep:], temperature,
                                   chunk_size, with_entropy)


def _rows_of(cache, rows: torch.Tensor, config):
    """A new KV cache holding rows `rows` of `cache` (a contiguous copy: attention over an expanded view is
    slower); gradients flow back to the original."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in cache.layers], config=config)


def shared_prompt_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        groups: torch.Tensor, lengths: list[int] | None = None, temperature: float = 1.0,
                        chunk_size: int = 512, with_entropy: bool = False):
    """Log-probs of completions whose prompts are shared: each prompt runs once, and every completion
    continues from its prompt's KV cache.

    prompt_ids, prompt_mask: [g, P] left-padded; completion_ids: [n, T] right-padded (padding only follows
    EOS, so causal attention keeps it from touching real tokens); groups: [n] the prompt row of each
    completion. lengths: [n] each completion's real tokens; with them the completions run in length_buckets,
    each trimmed to its longest (positions past the longest of a row's run are then 0). The same numbers as
    per_token_logps on prompt + completion rows, with every prompt computed once instead of once per completion.
    Returns [n, T] (with_entropy: and the entropies).
    """
    n, T = completion_ids.shape
    body = backbone(model)
    padded = not bool(prompt_mask.all())  # without padding the model's own causal mask is the fast path
    prompt_out = body(input_ids=prompt_ids, attention_mask=prompt_mask if padded else None,
                      position_ids=positions_from_mask(prompt_mask), use_cache=True)  # [g, P, H] + KV cache
    prompt_lengths = prompt_mask.sum(dim=1)  # [g]
    runs = length_buckets(lengths) if lengths is not None else [list(range(n))]
    outs = []
    for rows in runs:
        width = max(1, max(lengths[r] for r in rows)) if lengths is not None else T
        g = groups[rows]  # [r] the prompt of each row
        ids = completion_ids[rows, :width]  # [r, width]
        hidden = prompt_out.last_hidden_state[g, -1:]  # [r, 1, H]: the last prompt position predicts o_1
        if width > 1:  # o_2.. are predicted by the completion's own positions, on its prompt's KV cache
            mask = torch.cat([prompt_mask[g], prompt_mask.new_ones(len(rows), width - 1)], dim=1) if padded else None
            positions = prompt_lengths[g, None] + torch.arange(width - 1, device=ids.device)  # [r, width - 1]
            rest = body(input_ids=ids[:, :-1], attention_mask=mask, position_ids=positions,
                        past_key_values=_rows_of(prompt_out.past_key_values, g, body.config), use_cache=True)
            hidden = torch.cat([hidden, rest.last_hidden_state], dim=1)  # [r, width, H]
        out = token_logps_from_hidden(output_head(model), hidden, ids, temperature, chunk_size, with_entropy)
        outs.append((rows, out if with_entropy else (out,)))
    order = torch.tensor([r for rows, _ in outs for r in rows], device=completion_ids.device)
    results = tuple(torch.zeros(n, T, device=completion_ids.device, dtype=parts[0].dtype).index_put(
        (order,), torch.cat([torch.nn.functional.pad(p, (0, T - p.size(1))) for p in parts]))
        for parts in zip(*(o for _, o in outs)))
    return results if with_entropy else results[0]


def rollout_logps(model, rollout, indices: torch.Tensor, temperature: float = 1.0, chunk_size: int = 512,
                  share_prompt: bool = True, with_entropy: bool = False):
    """Log-probs [n, T] for the completions `indices` [n] of a rollout, trimmed to their longest length
    (no compute on padding columns) and padded back to the rollout's T with zeros. share_prompt: each prompt
    once (shared_prompt_logps), else every row runs prompt + completion (per_token_logps). with_entropy: the
    pair (log-probs, entropies [n, T] detached), both so padded."""
    T = rollout.completion_ids.size(1)
    ids = rollout.completion_ids[indices]  # [n, T]
    width = max(int(rollout.completion_mask[indices].sum(1).max()), 1)
    groups = rollout.group_index.to(indices.device)[indices]  # [n]
    if share_prompt:  # every prompt of these completions once, the completions on their prompt's cache
        used, local = groups.unique(sorted=True, return_inverse=True)  # [g] prompts, [n] row of each completion
        prompt_mask = rollout.prompt_mask[used]
        keep = int(prompt_mask.sum(1).max())  # drop padding columns every prompt shares
        lengths = rollout.completion_mask[indices].sum(1).tolist()
        out = shared_prompt_logps(model, rollout.prompt_ids[used][:, -keep:], prompt_mask[:, -keep:],
                                  ids[:, :width], local, lengths, temperature, chunk_size, with_entropy)
        outs = out if with_entropy else (out,)
    else:
        prompt_ids, prompt_mask = rollout.prompt_ids[groups], rollout.prompt_mask[groups]  # [n, P]
        keep = int(prompt_mask.sum(1).max())  # drop padding columns every row shares
        input_ids = torch.cat([prompt_ids[:, -keep:], ids[:, :width]], dim=1)
        attention_mask = torch.cat([prompt_mask[:, -keep:], rollout.completion_mask[indices][:, :width]], dim=1)
        out = per_token_logps(model, input_ids, attention_mask, width, temperature, chunk_size, with_entropy)
        outs = out if with_entropy else (out,)
    outs = tuple(torch.nn.functional.pad(o, (0, T - width)) for o in outs)
    return outs if with_entropy else outs[0]
