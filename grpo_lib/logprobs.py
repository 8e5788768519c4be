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

The shared-prompt path works under gradient checkpointing too. transformers' checkpointed layers drop the KV
cache (a replay in backward would append the layer's keys to it a second time), so the shared path hands them a
`replayable_cache` instead: each layer's update returns its fixed prefix (nothing, or the prompt's keys/values)
followed by the new keys/values and never grows, so the replay sees exactly what the first run saw; the layers are
told they may keep it (`cache_through_checkpointing`). Non-reentrant checkpointing is required: gradients reach the
prompt through the cache, a tensor the checkpointed layer closes over rather than takes as an argument.

The output head runs in the model's compute dtype (`head_dtype`): QLoRA's preparation upcasts the (tied) head to
fp32, and on a GPU without TF32 an fp32 [tokens, H] x [H, 151k] product is ~8x slower than fp16. The head weight is
cast once per call, the product is taken in fp16/bf16 (fp32 accumulation on tensor cores), and the logits are
upcast to fp32 before the log-softmax, so the normaliser and the log-probs are fp32 sums.

With `with_entropy=True` each function also returns H_t, the entropy of the temperature-scaled policy,
detached, taken from the [chunk, vocab] block already in memory: no second pass over the vocabulary, and
none in backward (checkpointing's recompute stops at the last tensor autograd saves, before the entropy).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from .models import model_compute_dtype


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The transformer without its output head (LoRA layers, when present, are inside it)."""
    return _base(model).get_decoder()


def output_head(model):
    return _base(model).get_output_embeddings()


def head_dtype(model) -> torch.dtype | None:
    """The dtype the output head's product runs in: the model's compute dtype when the head is a plain frozen
    linear layer held in a wider dtype (QLoRA: peft upcasts it to fp32), else None (the head as it is)."""
    head, dtype = output_head(model), model_compute_dtype(model)
    plain = type(head) is torch.nn.Linear and not head.weight.requires_grad
    wider = head.weight.dtype.itemsize > dtype.itemsize
    return dtype if plain and wider else None


def head_logits_fn(head, dtype: torch.dtype | None = None):
    """hidden [c, H] -> fp32 logits [c, V]. dtype: z = W h computed from a `dtype` copy of the head's weight (made
    once, here) and upcast, z = float(W_dtype h_dtype): the product at the compute dtype's speed, the log-softmax
    after it in fp32. None: head(hidden).float(). Gradients reach `hidden` either way (the weight is frozen)."""
    if dtype is None or head.weight.dtype == dtype:
        return lambda hidden: head(hidden).float()
    weight = head.weight.detach().to(dtype)  # [V, H]: V * H * 2 bytes while the call's graph lives
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    return lambda hidden: torch.nn.functional.linear(hidden.to(dtype), weight, bias).float()


def _chunk_entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per row, H = logsumexp(z) - sum_v softmax(z)_v z_v; no gradient.  [c, V], [c] -> [c]"""
    with torch.no_grad():
        return lse - torch.softmax(logits, dim=-1).mul_(logits).sum(dim=-1)  # one [c, V] temporary


def _chunk_logps(logits_fn, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                 with_entropy: bool = False):
    """hidden [c, H], targets [c] -> [c]: z[target] - logsumexp(z), z = logits_fn(hidden) / tau in fp32;
    with_entropy: (that, entropy [c]), the entropy computed after every tensor autograd saves, so that
    checkpointing's recompute in backward stops before it."""
    logits = logits_fn(hidden) / temperature  # [c, V] fp32
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    return (logps, _chunk_entropy(logits, lse)) if with_entropy else logps


def token_logps_from_hidden(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                            chunk_size: int = 512, with_entropy: bool = False, dtype: torch.dtype | None = None):
    """Log-probabilities of `targets` [N, T] given the hidden states that predict them [N, T, H];
    with_entropy: (log-probs, entropies [N, T] detached). dtype: the head's product in this dtype (head_dtype)."""
    logits_fn = head_logits_fn(head, dtype)
    N, T, H = hidden.shape
    flat_h, flat_t = hidden.reshape(N * T, H), targets.reshape(N * T)
    recompute = torch.is_grad_enabled() and flat_h.requires_grad
    chunks = []
    for start in range(0, N * T, chunk_size):
        h, t = flat_h[start:start + chunk_size], flat_t[start:start + chunk_size]
        if recompute:  # keep no [chunk, V] logits alive for backward: recompute them there
            out = checkpoint(_chunk_logps, logits_fn, h, t, temperature, with_entropy, use_reentrant=False)
        else:
            out = _chunk_logps(logits_fn, h, t, temperature, with_entropy)
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
                                   chunk_size, with_entropy, head_dtype(model))


def _replayable_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReplayableLayer(DynamicLayer):
        """One layer's keys/values [b, heads, S, d] for a forward that checkpointing may replay: update() returns
        cat(prefix, new), never cat(content so far, new), so a replay in backward gets what the first run got.
        Without a prefix (a prompt's forward) the new keys/values become the content, for completions to attend
        to; with one (completions on their prompt) they are returned and not kept: nothing reads them later."""

        def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
            super().__init__()
            self.prefix = prefix
            if prefix is not None:
                self.lazy_initialization(*prefix)
                self.keys, self.values = prefix

        def update(self, key_states, value_states, *args, **kwargs):
            if self.prefix is None:
                self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
                self.keys, self.values = key_states, value_states
                return key_states, value_states
            return torch.cat([self.prefix[0], key_states], dim=-2), torch.cat([self.prefix[1], value_states], dim=-2)

    return ReplayableLayer


def replayable_cache(num_layers: int, prefixes: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A KV cache of `num_layers` layers that a checkpointed forward may replay (ReplayableLayer), empty or
    holding `prefixes` [(keys, values) per layer] for the new tokens to attend to."""
    from transformers.cache_utils import Cache

    layer = _replayable_layer_class()
    return Cache(layers=[layer(None if prefixes is None else prefixes[i]) for i in range(num_layers)])


def _rows_of(cache, rows: torch.Tensor):
    """A replayable cache whose prefix is rows `rows` of `cache`'s keys/values (a contiguous copy: attention
    over an expanded view is slower); gradients flow back to the original."""
    return replayable_cache(len(cache.layers), [(layer.keys[rows], layer.values[rows]) for layer in cache.layers])


def _checkpointed_layers(body) -> list:
    """The decoder layers of `body` that transformers checkpoints (gradient checkpointing on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in body.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _is_reentrant(checkpoint_fn) -> bool:
    """Whether transformers' checkpoint function (a functools.partial of torch's checkpoint) runs the reentrant
    variant: use_reentrant=True, or not passed (torch's default then)."""
    return getattr(checkpoint_fn, "keywords", {}).get("use_reentrant", True) is not False


@contextlib.contextmanager
def cache_through_checkpointing(body):
    """Inside the block, `body`'s checkpointed layers keep the KV cache they are given (transformers drops it,
    since replaying a layer would append to a growing cache twice): only for a replayable_cache. Raises if the
    checkpointing is reentrant, which would not send gradients through the cache to the prompt."""
    layers = [m for m in _checkpointed_layers(body) if not m._can_checkpoint_with_cache]
    if any(_is_reentrant(m._gradient_checkpointing_func) for m in layers):
        raise ValueError("the shared-prompt forward under gradient checkpointing needs non-reentrant "
                         "checkpointing (gradients reach the prompt through its KV cache): enable it with "
                         "grpo_lib.models.enable_gradient_checkpointing(model), or set share_prompt_forward=False")
    for m in layers:
        m._can_checkpoint_with_cache = True  # an instance attribute over the class's False
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


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
    body, dtype = backbone(model), head_dtype(model)
    with cache_through_checkpointing(body):
        return _shared_prompt_logps(body, output_head(model), dtype, prompt_ids, prompt_mask, completion_ids,
                                    groups, lengths, temperature, chunk_size, with_entropy)


def _shared_prompt_logps(body, head, dtype, prompt_ids, prompt_mask, completion_ids, groups, lengths, temperature,
                         chunk_size, with_entropy):
    """shared_prompt_logps on the model's body and head, the head's product in `dtype` (head_dtype)."""
    n, T = completion_ids.shape
    padded = not bool(prompt_mask.all())  # without padding the model's own causal mask is the fast path
    prompt_cache = replayable_cache(body.config.num_hidden_layers)  # passed in: use_cache (True would only warn
    # under checkpointing) does not decide whether the layers fill it
    prompt_out = body(input_ids=prompt_ids, attention_mask=prompt_mask if padded else None,
                      position_ids=positions_from_mask(prompt_mask), past_key_values=prompt_cache,
                      use_cache=False)  # [g, P, H]; prompt_cache now holds the prompts' keys/values
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
                        past_key_values=_rows_of(prompt_cache, g), use_cache=False)
            hidden = torch.cat([hidden, rest.last_hidden_state], dim=1)  # [r, width, H]
        out = token_logps_from_hidden(head, hidden, ids, temperature, chunk_size, with_entropy, dtype)
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
