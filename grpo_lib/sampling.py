"""Sampling a group of G completions per prompt, with the masks GRPO needs.

Each prompt is prefilled once and its KV cache repeated for its G completions (shared_prompt_cache);
`decode` moves it into buffers with room for the whole completion (written in place, never concatenated),
samples token by token, and drops a row from the batch once it ends (at the next host synchronisation:
every token on a CPU, every SYNC_EVERY tokens on a GPU), so finished completions cost at most a few steps. The completion mask covers each completion up to and including its
first EOS; a completion that reaches max_completion_length without EOS is flagged truncated (it is
still scored and trained on).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .data import format_prompt
from .models import merged_adapters, model_device, model_mode


@dataclass
class Rollout:
    """G completions for each of `groups` prompts; completion i belongs to group i // G (group-major)."""

    prompts: list[str]  # [groups] formatted prompt texts
    prompt_ids: torch.Tensor  # [groups, P] left-padded prompt tokens (one row per group, not per completion)
    prompt_mask: torch.Tensor  # [groups, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded sampled tokens
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    completion_texts: list[str]  # [N] decoded, special tokens skipped
    truncated: torch.Tensor  # [N] bool: hit max_completion_length without EOS
    num_generations: int

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def group_index(self) -> torch.Tensor:
        """[N] the group of each completion."""
        return torch.arange(self.num_groups).repeat_interleave(self.num_generations)

    @property
    def lengths(self) -> torch.Tensor:
        """[N] completion tokens counted by the mask (EOS included)."""
        return self.completion_mask.sum(dim=1)

    def completion_id_lists(self) -> list[list[int]]:
        """[N] each completion's token ids up to and including its EOS (what TRL passes reward functions)."""
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), self.lengths.tolist())]


def cat_groups(parts: list[tuple[Rollout, list[int]]], pad_id: int) -> Rollout:
    """Some groups of several rollouts as one Rollout, in the order given: parts [(rollout, its groups)].
    Prompts are left-padded to the longest, completions right-padded to the longest (masks 0 on padding)."""
    G = parts[0][0].num_generations
    P = max(r.prompt_ids.size(1) for r, _ in parts)
    T = max(r.completion_ids.size(1) for r, _ in parts)
    pieces = {k: [] for k in ("prompts", "prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                              "completion_texts", "truncated")}
    for r, groups in parts:
        rows = [g * G + j for g in groups for j in range(G)]  # the groups' completions, group-major
        left, right = P - r.prompt_ids.size(1), T - r.completion_ids.size(1)
        pieces["prompts"] += [r.prompts[g] for g in groups]
        pieces["prompt_ids"].append(torch.nn.functional.pad(r.prompt_ids[groups], (left, 0), value=pad_id))
        pieces["prompt_mask"].append(torch.nn.functional.pad(r.prompt_mask[groups], (left, 0), value=0))
        pieces["completion_ids"].append(torch.nn.functional.pad(r.completion_ids[rows], (0, right), value=pad_id))
        pieces["completion_mask"].append(torch.nn.functional.pad(r.completion_mask[rows], (0, right), value=0))
        pieces["completion_texts"] += [r.completion_texts[i] for i in rows]
        pieces["truncated"].append(r.truncated[rows])
    tensors = {k: torch.cat(v) for k, v in pieces.items() if isinstance(v[0], torch.Tensor)}
    return Rollout(pieces["prompts"], completion_texts=pieces["completion_texts"], num_generations=G, **tensors)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (may be a list)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] = 1 up to and including the first EOS; truncated [N] = no EOS at all."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.size(1))  # [N]
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)[None, :]
    mask = (positions <= first_eos[:, None]).long()
    return mask, ~has_eos


def tokenize_prompts(tokenizer, prompt_texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask [groups, P]. The chat template already holds the special tokens. Left padding
    is asked for in the call, so the tokenizer's own padding_side (the caller's) is left as it was."""
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int):
    """KV cache of each prompt but its last token, computed once per group and repeated G times.

    prompt_ids, prompt_mask: [groups, P]. Decoding then starts from the last prompt token, so the
    prompt's prefill costs `groups` rows instead of groups * G: the same tokens, ~G times less prefill.
    """
    out = model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                position_ids=(prompt_mask[:, :-1].cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(num_generations)  # [groups, ...] -> [groups * G, ...], group-major
    return cache


def filtered_scores(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                    top_k: int | None = None) -> torch.Tensor:
    """logits [n, V] -> logits / temperature with the tokens outside the top-k and outside the top-p
    nucleus set to -inf (generate()'s order: temperature, top-k, top-p). The nucleus is the smallest
    set of most likely tokens whose probability reaches top_p; the most likely token always stays."""
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.size(-1)), dim=-1).values[:, -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach top_p
        drop = torch.zeros_like(outside).scatter(-1, order, outside)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


SAMPLING_BLOCK = 256  # tokens per block of draw(): ~sqrt of a 50k-150k vocabulary


def _inverse_cdf(mass: torch.Tensor) -> torch.Tensor:
    """One index per row of mass [n, k] >= 0, drawn with probability mass / row sum: the first i whose
    cumulative sum exceeds u ~ U[0, row sum). A zero-mass entry is never drawn (right=True: u < c[i] and
    u >= c[i-1] = c[i] cannot both hold); a u that float rounding puts at the row sum is clamped to the last
    entry with mass."""
    c = mass.cumsum(dim=-1)  # [n, k]
    u = torch.rand(c.size(0), 1, dtype=c.dtype, device=c.device) * c[:, -1:]
    last = (c < c[:, -1:]).sum(dim=-1, keepdim=True)  # index of the last entry with mass
    return torch.minimum(torch.searchsorted(c, u, right=True), last).squeeze(-1)


def draw(probs: torch.Tensor, block: int = SAMPLING_BLOCK) -> torch.Tensor:
    """One token per row of probs [n, V] (zero outside a filtered set), exactly as torch.multinomial(probs, 1)
    would in distribution, in two levels: a block of `block` tokens by its total mass, then a token inside it
    by the token's mass. A cumulative sum over V/block + block entries per row instead of multinomial's V
    exponential draws: ~10x faster for a 49k vocabulary on CPU, where it was a third of a decoding step."""
    n, V = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, (-V) % block)).view(n, -1, block)  # [n, V/block, block]
    b = _inverse_cdf(blocks.sum(dim=-1))  # [n] the block
    inside = blocks[torch.arange(n, device=probs.device), b]  # [n, block]
    return b * block + _inverse_cdf(inside)


def next_tokens(logits: torch.Tensor, temperature: float | None, top_p: float = 1.0,
                top_k: int | None = None) -> torch.Tensor:
    """logits [n, V] -> token ids [n]: one draw from softmax(filtered_scores), or argmax when
    temperature is None or 0 (greedy). Draws use torch's global RNG."""
    if not temperature:
        return logits.argmax(dim=-1)
    return draw(filtered_scores(logits, temperature, top_p, top_k).softmax(dim=-1))


class NonFiniteLogitsError(FloatingPointError):
    """The policy's logits held inf or NaN while sampling (typically an fp16 overflow)."""


def nonfinite_logits_message(logits: torch.Tensor, step: int, rows: torch.Tensor) -> str:
    """What overflowed at decoding `step` (0-based) in logits [n, V] of the completions `rows` [n], and what to do."""
    bad_rows = rows[(~torch.isfinite(logits)).any(dim=-1)].tolist()
    counts = {"NaN": int(logits.isnan().sum()), "+inf": int(logits.isposinf().sum()),
              "-inf": int(logits.isneginf().sum())}
    return (f"the policy's logits are not finite at decoding step {step + 1} (completion token {step + 1}) in "
            f"{len(bad_rows)} of {len(rows)} rows (completions {bad_rows[:8]}{' ...' if len(bad_rows) > 8 else ''}): "
            f"{', '.join(f'{v} {k}' for k, v in counts.items() if v)} of {logits.numel()} values, dtype "
            f"{str(logits.dtype).replace('torch.', '')}. "
            "Under fp16 compute (a T4's) activations above 65504 overflow to inf, and Qwen2-family models are "
            "known to overflow in fp16. Sample in float32 or bfloat16: config dtype='bfloat16' where the GPU has "
            "bf16 (compute capability 8+), else dtype='float32' (a T4: more memory, see `python -m grpo_lib plan`). "
            "If it happens only after training steps, the adapter has diverged: resume from an earlier checkpoint "
            "with a lower learning_rate.")


SYNC_EVERY = 8
"""Decoding steps between host synchronisations on an asynchronous device (CUDA): reading a flag back makes the
host wait for the GPU's queue to drain, so finished rows leave, and non-finite logits are reported, every
SYNC_EVERY tokens; a finished row decodes padding until then. On a CPU every op has finished when it returns:
a flag costs nothing to read, so rows leave (and the check runs) after every token."""


def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """One layer's keys/values in a buffer [N, heads, capacity, d] allocated once for the whole completion:
        a decoding step writes its token's keys/values in place and attends over the filled part, a view
        [n, heads, length, d] (a DynamicLayer concatenates, copying the whole cache, every step). Rows that
        leave are compacted to the front; the buffer keeps its first allocation."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            self.lazy_initialization(keys, values)
            n, h, length, d = keys.shape
            self.key_buffer, self.value_buffer = keys.new_empty(n, h, capacity, d), values.new_empty(n, h, capacity, d)
            self.key_buffer[:, :, :length], self.value_buffer[:, :, :length] = keys, values
            self.rows, self.length = n, length
            self._view()

        def _view(self):
            self.keys = self.key_buffer[:self.rows, :, :self.length]
            self.values = self.value_buffer[:self.rows, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.size(-2)
            if end > self.key_buffer.size(2):
                raise RuntimeError(f"decoding past the preallocated cache ({self.key_buffer.size(2)} positions)")
            self.key_buffer[:self.rows, :, self.length:end] = key_states
            self.value_buffer[:self.rows, :, self.length:end] = value_states
            self.length = end
            self._view()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            k = len(indices)
            self.key_buffer[:k, :, :self.length] = self.keys[indices]  # indices ascending: a gather, then a copy
            self.value_buffer[:k, :, :self.length] = self.values[indices]
            self.rows = k
            self._view()

    return PreallocatedLayer


def preallocated_cache(cache, new_tokens: int):
    """The keys/values of a DynamicCache [N, heads, S, d] per layer in PreallocatedLayers with room for
    `new_tokens` more positions."""
    from transformers.cache_utils import Cache

    layer = _preallocated_layer_class()
    return Cache(layers=[layer(l.keys, l.values, l.keys.size(2) + new_tokens) for l in cache.layers])


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache, max_new_tokens: int,
           eos_ids: list[int], pad_id: int, temperature: float | None = 1.0, top_p: float = 1.0,
           top_k: int | None = None, sync_every: int | None = None) -> torch.Tensor:
    """Completions [N, T <= max_new_tokens] of left-padded prompts [N, P] whose KV `cache` holds every
    prompt token but the last (shared_prompt_cache); ids after a row's first EOS are pad_id.

    The cache is moved once into buffers with room for the whole completion (preallocated_cache). A row that
    samples EOS leaves the batch at the next host synchronisation, every `sync_every` steps (default: 1 on a
    CPU, SYNC_EVERY on a GPU): its cache rows are dropped, so later steps run only the rows still writing
    (generate() keeps computing finished rows until the longest is done).
    Raises NonFiniteLogitsError on inf/NaN logits (an fp16 overflow), where multinomial sampling would fail too.
    """
    N, P = prompt_ids.shape
    device = prompt_ids.device
    sync_every = sync_every or (1 if device.type == "cpu" else SYNC_EVERY)
    cache = preallocated_cache(cache, max_new_tokens)
    out = torch.full((N, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=device)
    eos = torch.tensor(eos_ids, device=device)
    rows = torch.arange(N, device=device)  # the rows still in the batch, in cache order
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(N, max_new_tokens)], dim=1)  # [n, P + T]: step t reads P + t
    tokens = prompt_ids[:, -1:]  # [n, 1] next input
    position = prompt_mask.sum(dim=1, keepdim=True) - 1  # [n, 1] position of the next input
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # [n] sampled EOS, still in the batch
    last = torch.zeros((), dtype=torch.long, device=device)  # the last step at which a row finished
    window = []  # (logits [n, V], all finite []) of the steps since the last synchronisation
    for t in range(max_new_tokens):
        logits = model(input_ids=tokens, attention_mask=mask[:, :P + t], position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # [n, V]
        new = next_tokens(logits, temperature, top_p, top_k).masked_fill(finished, pad_id)  # [n]
        out[rows, t] = new
        ends = torch.isin(new, eos) & ~finished
        finished, last = finished | ends, torch.where(ends.any(), t, last)
        window.append((logits, torch.isfinite(logits).all()))
        tokens, position = new[:, None], position + 1
        if (t + 1) % sync_every and t + 1 < max_new_tokens:
            continue
        # --- one host synchronisation: the window's finiteness, the last finishing step, the finished rows ---
        flags = torch.cat([torch.stack([f for _, f in window]).long(), last[None], finished.long()]).tolist()
        finite, t_last, done = flags[:len(window)], flags[len(window)], flags[len(window) + 1:]
        if not all(finite):  # a draw from inf/NaN logits is garbage (token 0), never an error
            bad = finite.index(0)
            raise NonFiniteLogitsError(nonfinite_logits_message(window[bad][0], t + 1 - len(window) + bad, rows))
        window = []
        if all(done):
            return out[:, :t_last + 1]
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
            cache.batch_select_indices(keep)
            rows, tokens, mask, position = rows[keep], tokens[keep], mask[keep], position[keep]
            finished = finished[keep]
    return out


def finish_completions(completion_ids: torch.Tensor, eos_ids: list[int], tokenizer):
    """Sampled ids [B, T] -> (ids with padding after the first EOS, mask [B, T], truncated [B], texts [B])."""
    mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return completion_ids, mask, truncated, tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         max_completion_length: int, **sampling):
    """model.generate on left-padded prompts [B, P] -> finish_completions' (ids [B, T], mask [B, T],
    truncated [B], texts [B]). `sampling` goes to generate(). Used for greedy evaluation, and as the
    plain reference the benchmark compares sample_groups with."""
    eos_ids = eos_token_ids(model, tokenizer)
    with model_mode(model, training=False):  # no dropout while sampling
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_completion_length,
                             eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, **sampling)
    return finish_completions(out[:, prompt_ids.size(1):], eos_ids, tokenizer)


def sample_groups(model, tokenizer, prompts: list, num_generations: int, max_completion_length: int,
                  temperature: float = 1.0, top_p: float = 1.0, merge_adapters: bool = True) -> Rollout:
    """Sample `num_generations` completions for each prompt (torch's global RNG drives the sampling).

    prompts: [groups] chat message lists or already formatted strings. merge_adapters: sample with LoRA
    merged into plain base weights (models.merged_adapters: one matmul per layer instead of three).
    Returns a Rollout with completion tensors [N = groups * G, T <= max_completion_length], on the model's device.
    """
    texts = [format_prompt(tokenizer, p) for p in prompts]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, texts, model_device(model))  # [groups, P]
    eos_ids = eos_token_ids(model, tokenizer)
    merged = merged_adapters(model) if merge_adapters else contextlib.nullcontext(model)
    with model_mode(model, training=False), merged as policy:  # no dropout while sampling
        # the prompts' cache passed on, not kept here: decode moves it into its own buffers and frees it
        sampled = decode(policy, prompt_ids.repeat_interleave(num_generations, dim=0),  # [N, P]
                         prompt_mask.repeat_interleave(num_generations, dim=0),
                         shared_prompt_cache(policy, prompt_ids, prompt_mask, num_generations),
                         max_completion_length, eos_ids, tokenizer.pad_token_id, temperature, top_p)
    completion_ids, mask, truncated, completion_texts = finish_completions(sampled, eos_ids, tokenizer)
    return Rollout(texts, prompt_ids, prompt_mask, completion_ids, mask, completion_texts, truncated,
                   num_generations)
