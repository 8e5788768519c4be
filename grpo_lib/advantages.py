"""Group-relative advantages: how much better each completion did than its siblings.

    A_i = (r_i - mean(r_group)) / (std + eps)        the same A_i for every token of completion i

GRPO needs no value network: the group mean is the baseline. A group whose G rewards are all equal
(all right or all wrong) has A = 0 for every member, so it contributes no policy gradient.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4):
    """Z-score rewards inside each group.

    rewards: [groups, G] totals.  scale: divide by the std over the "group" (GRPO), over the whole
    "batch" (Hu et al. 2025, more robust to easy/hard groups), or "none" (Dr. GRPO: no std bias).
    Returns (advantages [groups, G], zero_std [groups] bool). std is torch.std's unbiased estimate, as in
    TRL. Zero-variance groups get exactly 0, never NaN, even when scale="batch" or "none".
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; choose one of {SCALES}")
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [groups, G]
    zero_std = (rewards == rewards[:, :1]).all(dim=1)  # [groups] exact equality: no float noise
    if scale == "group":
        advantages = centred / (rewards.std(dim=1, keepdim=True) + eps)  # std: [groups, 1]
    elif scale == "batch":
        advantages = centred / (rewards.std() + eps)  # one std over all groups * G rewards
    else:
        advantages = centred
    advantages = torch.where(zero_std[:, None], torch.zeros_like(advantages), advantages)
    return advantages, zero_std


def advantage_stats(rewards: torch.Tensor, advantages: torch.Tensor, zero_std: torch.Tensor) -> dict[str, float]:
    """Diagnostics of one batch: rewards/advantages [groups, G], zero_std [groups]."""
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward/group_std_mean": rewards.std(dim=1).mean().item(),
        "adv/zero_std_frac": zero_std.float().mean().item(),
        "adv/abs_mean": advantages.abs().mean().item(),
    }
