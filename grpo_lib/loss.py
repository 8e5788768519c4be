"""The GRPO objective (DeepSeekMath eq. 3) as small pure functions, one per term.

    J = agg_t [ min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A) - beta * KL_t ]      loss = -J
    rho_t = exp(logp_t - old_logp_t)                 ratio to the policy that sampled the completion
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   k3 estimator (Schulman 2020): unbiased, >= 0

The variants, under TRL 1.16's names (its GRPOTrainer._compute_loss):
    GSPO   importance_sampling_level="sequence": every rho_t of completion i is replaced by
           s_i = exp((1/|o_i|) sum_t (logp_it - old_it)), clipped as above (GSPO, Zheng et al. 2025)
    CISPO  loss_type="cispo": loss_t = -sg(min(rho_t, eps_max)) A logp_t, the weight clipped, not the update
           (CISPO, MiniMax-M1 2025; the cap is epsilon_high itself, as TRL has it)
    DAPO   truncated completions out of the loss mask (mask_truncated_completions)
    80/20  the policy term only on the top-rho tokens by entropy (high_entropy_mask; Wang et al. 2025)

All tensors are [N, T] over completion positions (N completions, T = longest completion);
`mask` is 1 on real completion tokens (EOS included) and 0 on padding; `advantages` is [N].
Results live on the device of the log-probs (or ratio / per-token loss): advantages and masks may come
from the CPU (rewards are scored there) and are moved, so a caller never has to.
"""

from __future__ import annotations

import torch

from .config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean over real tokens, sum_it v_it m_it / sum_it m_it (0 without any).  [N, T] -> scalar"""
    mask = mask.to(values.device, values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def probability_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """rho = exp(logp - old_logp).  [N, T] -> [N, T]"""
    return torch.exp(logps - old_logps.to(logps.device))


def sequence_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence importance ratio (Zheng et al. 2025, arXiv 2507.18071), the per-token log-ratio
    averaged over the completion's tokens:

        s_i = (pi(o_i) / pi_old(o_i))^(1/|o_i|) = exp((1/|o_i|) sum_t m_it (logp_it - old_it))

    logps, old_logps, mask [N, T] -> [N, 1]"""
    mask = mask.to(logps.device, logps.dtype)
    log_ratio = (logps - old_logps.to(logps.device)) * mask
    return torch.exp(log_ratio.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0))


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float) -> torch.Tensor:
    """Per-token PPO loss  -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).  ratio [N, T], advantages [N]."""
    A = advantages.to(ratio.device)[:, None]  # [N, 1]: one advantage for every token of a completion
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A
    return -torch.min(unclipped, clipped)


def cispo_surrogate(logps: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor,
                    epsilon_max: float) -> torch.Tensor:
    """Per-token CISPO loss  -sg(min(rho, eps_max)) A logp  (MiniMax-M1, arXiv 2506.13585; upper bound only,
    as in TRL): the importance weight is clipped and detached, so every token keeps the gradient -w A d logp,
    none is dropped by the clip.  logps, ratio [N, T], advantages [N] -> [N, T]"""
    weight = torch.clamp(ratio, max=epsilon_max).detach()
    return -weight * advantages.to(logps.device)[:, None] * logps


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) per token, k3 estimator: exp(ref - logp) - (ref - logp) - 1 >= 0.  [N, T]"""
    delta = ref_logps.to(logps.device) - logps
    return torch.exp(delta) - delta - 1


def mask_truncated_completions(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering (Yu et al. 2025, arXiv 2503.14476): the loss mask m_it * (1 - trunc_i), without
    the completions that hit max_completion_length without EOS.  mask [N, T], truncated [N] bool -> [N, T]"""
    return mask * (~truncated.to(mask.device).bool())[:, None].to(mask.dtype)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The tokens to train on with top_entropy_quantile = rho ("Beyond the 80/20 rule", Wang et al. 2025,
    arXiv 2506.01939), as TRL's get_high_entropy_mask:

        keep_it = m_it and H_it >= Q_{1-rho}({H_js : m_js = 1})

    Q_q the q-quantile (linear interpolation) of the entropies of the real tokens.
    entropies, mask [N, T] -> [N, T] bool (False on padding)"""
    m = mask.to(entropies.device).bool()
    real = entropies[m].float()
    if real.numel() == 0:
        return m
    return (entropies >= torch.quantile(real, 1.0 - quantile)) & m


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                   max_completion_length: int | None = None, num_sequences: float | None = None,
                   num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [N, T] to a scalar, as TRL does for each loss_type:

        grpo:    (1/N) sum_i (1/|o_i|) sum_t l_it        sequence mean, then mean (DeepSeekMath)
        bnpo:    sum_it l_it / sum_it m_it                token mean over the (micro-)batch
        dapo:    sum_it l_it / sum_it m_it                token mean over the whole generation batch
        cispo:   as dapo (TRL normalises both by the generation batch's tokens, num_items_in_batch)
        dr_grpo: sum_it l_it / (N * max_completion_length)   constant normaliser (Dr. GRPO)

    num_sequences / num_tokens override N and sum(m) so that micro-batches of one step add up to the
    full-batch loss exactly (see microbatch_normalizers).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
    mask = mask.to(per_token.device, per_token.dtype)
    masked = per_token * mask
    N = per_token.size(0) if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N]
        return per_sequence.sum() / N
    if loss_type in ("bnpo", "dapo", "cispo"):
        tokens = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return masked.sum() / tokens
    L = per_token.size(1) if max_completion_length is None else max_completion_length
    return masked.sum() / (N * L)


def microbatch_normalizers(loss_type: str, micro_mask: torch.Tensor, full_mask: torch.Tensor,
                           num_micro: int) -> dict:
    """num_sequences / num_tokens for aggregate_loss on one micro-batch so that summing micro-batch
    losses reproduces the full-batch loss (grpo, dr_grpo, dapo, cispo), or TRL's per-micro-batch token mean
    averaged over micro-batches (bnpo)."""
    if loss_type == "bnpo":
        return {"num_sequences": None, "num_tokens": micro_mask.sum().clamp(min=1.0).item() * num_micro}
    return {"num_sequences": full_mask.size(0), "num_tokens": full_mask.sum().clamp(min=1.0).item()}


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                   epsilon_high: float) -> dict[str, float]:
    """Share of tokens whose gradient the clip removes: low = rho < 1-eps with A < 0, high = rho > 1+eps
    with A > 0, region = either (TRL's definitions, token-averaged)."""
    A = advantages.to(ratio.device)[:, None]
    low = (ratio < 1 - epsilon_low) & (A < 0)
    high = (ratio > 1 + epsilon_high) & (A > 0)
    return {
        "clip/low": masked_mean(low.float(), mask).item(),
        "clip/high": masked_mean(high.float(), mask).item(),
        "clip/region": masked_mean((low | high).float(), mask).item(),
    }


def cispo_clip_fraction(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        epsilon_max: float) -> dict[str, float]:
    """Share of tokens whose CISPO weight the cap lowers, rho > eps_max with A > 0 (TRL's cispo_clip_ratio)."""
    clipped = (ratio > epsilon_max) & (advantages.to(ratio.device)[:, None] > 0)
    return {"clip/cispo": masked_mean(clipped.float(), mask).item()}


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str = "grpo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.04, max_completion_length: int | None = None,
              num_sequences: float | None = None, num_tokens: float | None = None,
              importance_sampling_level: str = "token", entropies: torch.Tensor | None = None,
              top_entropy_quantile: float = 1.0):
    """The GRPO loss (or one of its variants, see the module docstring) and its diagnostics.

    logps, old_logps, ref_logps, mask: [N, T]; advantages: [N]. old_logps=None means the completions
    were sampled by the current parameters (mu=1), so rho = 1 with the gradient of logp. ref_logps may be
    None when beta == 0. `mask` is the loss mask (mask_truncated_completions applied by the caller, so that
    the micro-batch normalisers count the same tokens). importance_sampling_level: "token", or "sequence"
    (GSPO: every token of a completion carries its sequence ratio, so the clip fractions count tokens).
    entropies [N, T], detached: the policy's per-token entropies; with top_entropy_quantile < 1 only the
    policy term of the high-entropy tokens counts (the KL term and the normalisers keep every token, as in TRL).
    Returns (loss scalar, stats dict of floats).
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}; choose one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages, mask = advantages.to(logps.device), mask.to(logps.device)
    if old_logps is None:
        old_logps = logps.detach()
    if importance_sampling_level == "sequence":
        ratio = sequence_ratio(logps, old_logps, mask).expand_as(logps)  # [N, T]: one ratio per completion
    else:
        ratio = probability_ratio(logps, old_logps)  # [N, T]
    if loss_type == "cispo":
        per_token = cispo_surrogate(logps, ratio, advantages, epsilon_high)  # [N, T]
        clip_stats = cispo_clip_fraction(ratio.detach(), advantages, mask, epsilon_high)
    else:
        per_token = clipped_surrogate(ratio, advantages, epsilon, epsilon_high)  # [N, T]
        clip_stats = clip_fractions(ratio.detach(), advantages, mask, epsilon, epsilon_high)
    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs entropies (the policy's per-token entropies)")
        per_token = per_token * high_entropy_mask(entropies.to(logps.device), mask, top_entropy_quantile)
    stats = {"tokens": mask.sum().item()}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference policy's log-probabilities)")
        kl = k3_kl(logps, ref_logps)  # [N, T]
        per_token = per_token + beta * kl
        stats["kl/mean"] = masked_mean(kl.detach(), mask).item()
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, num_sequences, num_tokens)
    stats.update(clip_stats)
    stats["ratio/mean"] = masked_mean(ratio.detach(), mask).item()
    return loss, stats


def loss_kwargs(config) -> dict:
    """The grpo_loss keywords a GRPOConfig sets. The trainer and the notebooks both pass these, so every loss knob
    reaches the loss the same way (entropies and the micro-batch normalisers come from the caller)."""
    return {"loss_type": config.loss_type, "epsilon": config.epsilon, "epsilon_high": config.epsilon_high,
            "beta": config.beta, "max_completion_length": config.max_completion_length,
            "importance_sampling_level": config.importance_sampling_level,
            "top_entropy_quantile": config.top_entropy_quantile}


def gradient_weights(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     **kwargs) -> torch.Tensor:
    """Each token's weight in the policy gradient, w_it = -d loss / d logp_it, by autograd through grpo_loss
    without the KL term: a gradient step raises logp_it along its own gradient in proportion to w_it.

        at rho = 1:  grpo  A_i / (N |o_i|)    bnpo, dapo, cispo  A_i / sum_j |o_j|    dr_grpo  A_i / (N L_max)

    The clip (and top_entropy_quantile) show up as w_it = 0 on the tokens they drop.
    logps, old_logps, mask [N, T]; advantages [N]; kwargs: grpo_loss's keywords (loss_kwargs(config), entropies),
    beta is set to 0. -> [N, T] on the device of logps, 0 on padding."""
    logps = logps.detach().clone().requires_grad_(True)
    value, _ = grpo_loss(logps, old_logps, None, advantages, mask, **{**kwargs, "beta": 0.0})
    return -torch.autograd.grad(value, logps)[0]
