"""The GRPO objective (DeepSeekMath eq. 3) as small pure functions, one per term.

    J = agg_t [ min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A) - beta * KL_t ]      loss = -J
    rho_t = exp(logp_t - old_logp_t)                 ratio to the policy that sampled the completion
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   k3 estimator (Schulman 2020): unbiased, >= 0

All tensors are [N, T] over completion positions (N completions, T = longest completion);
`mask` is 1 on real completion tokens (EOS included) and 0 on padding; `advantages` is [N].
"""

from __future__ import annotations

import torch

from .config import LOSS_TYPES


def probability_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """rho = exp(logp - old_logp).  [N, T] -> [N, T]"""
    return torch.exp(logps - old_logps)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float) -> torch.Tensor:
    """Per-token PPO loss  -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).  ratio [N, T], advantages [N]."""
    A = advantages[:, None]  # [N, 1]: one advantage for every token of a completion
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A
    return -torch.min(unclipped, clipped)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) per token, k3 estimator: exp(ref - logp) - (ref - logp) - 1 >= 0.  [N, T]"""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                   max_completion_length: int | None = None, num_sequences: float | None = None,
                   num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [N, T] to a scalar, as TRL does for each loss_type:

        grpo:    (1/N) sum_i (1/|o_i|) sum_t l_it        sequence mean, then mean (DeepSeekMath)
        bnpo:    sum_it l_it / sum_it m_it                token mean over the (micro-)batch
        dapo:    sum_it l_it / sum_it m_it                token mean over the whole generation batch
        dr_grpo: sum_it l_it / (N * max_completion_length)   constant normaliser (Dr. GRPO)

    num_sequences / num_tokens override N and sum(m) so that micro-batches of one step add up to the
    full-batch loss exactly (see microbatch_normalizers).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    N = per_token.size(0) if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N]
        return per_sequence.sum() / N
    if loss_type in ("bnpo", "dapo"):
        tokens = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return masked.sum() / tokens
    L = per_token.size(1) if max_completion_length is None else max_completion_length
    return masked.sum() / (N * L)


def microbatch_normalizers(loss_type: str, micro_mask: torch.Tensor, full_mask: torch.Tensor,
                           num_micro: int) -> dict:
    """num_sequences / num_tokens for aggregate_loss on one micro-batch so that summing micro-batch
    losses reproduces the full-batch loss (grpo, dr_grpo, dapo), or TRL's per-micro-batch token mean
    averaged over micro-batches (bnpo)."""
    if loss_type == "bnpo":
        return {"num_sequences": None, "num_tokens": micro_mask.sum().clamp(min=1.0).item() * num_micro}
    return {"num_sequences": full_mask.size(0), "num_tokens": full_mask.sum().clamp(min=1.0).item()}


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                   epsilon_high: float) -> dict[str, float]:
    """Share of tokens whose gradient the clip removes: low = rho < 1-eps with A < 0, high = rho > 1+eps
    with A > 0, region = either (TRL's definitions, token-averaged)."""
    A = advantages[:, None]
    low = (ratio < 1 - epsilon_low) & (A < 0)
    high = (ratio > 1 + epsilon_high) & (A > 0)
    m = mask.bool()
    tokens = m.sum().clamp(min=1)
    return {
        "clip/low": ((low & m).sum() / tokens).item(),
        "clip/high": ((high & m).sum() / tokens).item(),
        "clip/region": (((low | high) & m).sum() / tokens).item(),
    }


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str = "grpo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.04, max_completion_length: int | None = None,
              num_sequences: float | None = None, num_tokens: float | None = None):
    """The GRPO loss and its diagnostics.

    logps, old_logps, ref_logps, mask: [N, T]; advantages: [N]. old_logps=None means the completions
    were sampled by the current parameters (mu=1), so rho = 1 with the gradient of logp. ref_logps may be
    None when beta == 0. Returns (loss scalar, stats dict of floats).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if old_logps is None:
        old_logps = logps.detach()
    ratio = probability_ratio(logps, old_logps)  # [N, T]
    per_token = clipped_surrogate(ratio, advantages, epsilon, epsilon_high)  # [N, T]
    m = mask.to(logps.dtype)
    tokens = m.sum().clamp(min=1.0)
    stats = {"tokens": m.sum().item()}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference policy's log-probabilities)")
        kl = k3_kl(logps, ref_logps)  # [N, T]
        per_token = per_token + beta * kl
        stats["kl/mean"] = ((kl * m).sum() / tokens).item()
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, num_sequences, num_tokens)
    stats.update(clip_fractions(ratio.detach(), advantages, mask, epsilon, epsilon_high))
    stats["ratio/mean"] = ((ratio.detach() * m).sum() / tokens).item()
    return loss, stats
