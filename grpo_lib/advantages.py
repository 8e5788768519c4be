"""Group-relative advantages: how much better each completion did than its siblings.

    A_i = (r_i - mean(r_group)) / (std + eps)        the same A_i for every token of completion i

GRPO needs no value network: the group mean is the baseline. A group whose G rewards are all equal
(all right or all wrong) has A = 0 for every member, so it contributes no policy gradient.
An unscorable completion (reward NaN: no reward function applies to it) is left out of its group's
mean and std and gets A = 0, as in TRL: it is not a completion that scored 0.
"""

from __future__ import annotations

import torch

from .config import SCALE_REWARDS as SCALES


def _nan_std(centred: torch.Tensor, valid: torch.Tensor, dim=None) -> torch.Tensor:
    """Unbiased std (as torch.std) of the valid entries of `centred` (already minus their mean)."""
    n = valid.sum(dim=dim, keepdim=dim is not None)
    return ((centred ** 2).sum(dim=dim, keepdim=dim is not None) / (n - 1).clamp(min=1)).sqrt()


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4):
    """Z-score rewards inside each group.

    rewards: [groups, G] totals, NaN for unscorable completions.  scale: divide by the std over the
    "group" (GRPO), over the whole "batch" (Hu et al. 2025, more robust to easy/hard groups), or "none"
    (Dr. GRPO: no std bias). Returns (advantages [groups, G], zero_std [groups] bool) on the rewards'
    device. std is torch.std's unbiased estimate, as in TRL. Zero-variance groups (and groups with fewer
    than 2 scorable completions) get exactly 0, never NaN, even when scale="batch" or "none".
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; choose one of {SCALES}")
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    valid = ~rewards.isnan()  # [groups, G]
    n = valid.sum(dim=1, keepdim=True)  # [groups, 1] scorable completions per group
    mean = rewards.nan_to_num(0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # [groups, 1]
    centred = torch.where(valid, rewards - mean, 0.0)  # [groups, G]
    highest = rewards.masked_fill(~valid, float("-inf")).amax(dim=1)
    lowest = rewards.masked_fill(~valid, float("inf")).amin(dim=1)
    zero_std = (n.squeeze(1) < 2) | (highest == lowest)  # [groups] exact equality: no float noise
    if scale == "group":
        advantages = centred / (_nan_std(centred, valid, dim=1) + eps)  # std: [groups, 1]
    elif scale == "batch":
        batch_centred = torch.where(valid, rewards - rewards.nanmean(), 0.0)
        advantages = centred / (_nan_std(batch_centred, valid) + eps)  # one std over all scorable rewards
    else:
        advantages = centred
    advantages = torch.where(zero_std[:, None] | ~valid, 0.0, advantages)
    return advantages, zero_std


def advantage_stats(rewards: torch.Tensor, advantages: torch.Tensor, zero_std: torch.Tensor) -> dict[str, float]:
    """Diagnostics of one batch: rewards/advantages [groups, G] (rewards NaN where unscorable), zero_std [groups].
    Reward statistics are over the scorable completions."""
    valid = ~rewards.isnan()
    scorable = rewards[valid]
    group_std = _nan_std(torch.where(valid, rewards - rewards.nanmean(dim=1, keepdim=True), 0.0), valid, dim=1)
    return {
        "reward/mean": scorable.mean().item() if scorable.numel() else float("nan"),
        "reward/std": scorable.std().item() if scorable.numel() > 1 else 0.0,
        "reward/group_std_mean": group_std.mean().item(),
        "reward/unscorable_frac": (~valid).float().mean().item(),
        "adv/zero_std_frac": zero_std.float().mean().item(),
        "adv/abs_mean": advantages.abs().mean().item(),
    }
