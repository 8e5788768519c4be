"""Per-token log-probabilities of completions, without the full [N, T, vocab] logits tensor.

    log pi(o_t | q, o_<t) = z[o_t] / tau - logsumexp(z / tau)       z = lm_head(h_{t-1})
    H_t = -sum_v p_v log p_v = logsumexp(z / tau) - sum_v p_v z_v / tau      p = softmax(z / tau)

Only completion positions go through the output head, `chunk_size` positions at a time; with
gradients on, each chunk is recomputed in backward (activation checkpointing), so peak memory holds
one [chunk, vocab] block instead of N*T of them. `group_token_logps` runs a group's shared prompt
once and its G completions on top of the prompt's KV cache: the same numbers as the plain path
(gradients flow through the cache into the prompt's activations) for about 1/G of the prompt compute.

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


def group_token_logps(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0,
                      chunk_size: int = 512, with_entropy: bool = False):
    """Log-probs of G completions of one prompt, the prompt run once.

    prompt_ids: [P] (no padding); completion_ids: [G, T] right-padded (padding only follows EOS, so
    causal attention keeps it from touching real tokens). Returns [G, T] (with_entropy: and the entropies).
    """
    G = completion_ids.size(0)
    body = backbone(model)
    prompt_out = body(input_ids=prompt_ids[None], use_cache=True)  # [1, P, H] + KV cache
    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(G)  # share the prompt's keys/values with all G completions
    hidden_first = prompt_out.last_hidden_state[:, -1:].expand(G, 1, -1)  # [G, 1, H] predicts o_1
    if completion_ids.size(1) > 1:
        rest = body(input_ids=completion_ids[:, :-1], past_key_values=cache, use_cache=True)
        hidden = torch.cat([hidden_first, rest.last_hidden_state], dim=1)  # [G, T, H]
    else:
        hidden = hidden_first
    return token_logps_from_hidden(output_head(model), hidden, completion_ids, temperature, chunk_size, with_entropy)


def rollout_logps(model, rollout, indices: torch.Tensor, temperature: float = 1.0, chunk_size: int = 512,
                  share_prompt: bool = True, with_entropy: bool = False):
    """Log-probs [n, T] for the completions `indices` [n] of a rollout, trimmed to their longest length
    (no compute on padding columns) and padded back to the rollout's T with zeros; with_entropy: the pair
    (log-probs, entropies [n, T] detached), both so padded."""
    T = rollout.completion_ids.size(1)
    ids = rollout.completion_ids[indices]  # [n, T]
    width = max(int(rollout.completion_mask[indices].sum(1).max()), 1)
    groups = rollout.group_index.to(indices.device)[indices]  # [n]
    if share_prompt:
        rows, parts = [], []
        for g in groups.unique(sorted=True).tolist():
            rows.append((groups == g).nonzero().flatten())
            prompt = rollout.prompt_ids[g][rollout.prompt_mask[g].bool()]  # [P_g] without padding
            out = group_token_logps(model, prompt, ids[rows[-1], :width], temperature, chunk_size, with_entropy)
            parts.append(out if with_entropy else (out,))
        order = torch.cat(rows)
        outs = [torch.zeros(len(indices), width, device=ids.device, dtype=p[0].dtype).index_put((order,), torch.cat(p))
                for p in zip(*parts)]
    else:
        prompt_ids, prompt_mask = rollout.prompt_ids[groups], rollout.prompt_mask[groups]  # [n, P]
        keep = int(prompt_mask.sum(1).max())  # drop padding columns every row shares
        input_ids = torch.cat([prompt_ids[:, -keep:], ids[:, :width]], dim=1)
        attention_mask = torch.cat([prompt_mask[:, -keep:], rollout.completion_mask[indices][:, :width]], dim=1)
        out = per_token_logps(model, input_ids, attention_mask, width, temperature, chunk_size, with_entropy)
        outs = out if with_entropy else (out,)
    outs = tuple(torch.nn.functional.pad(o, (0, T - width)) for o in outs)
    return outs if with_entropy else outs[0]
