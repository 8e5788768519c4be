"""group_advantages against hand-computed matrices."""

import math

import pytest
import torch

from grpo_lib.advantages import advantage_stats, group_advantages


def test_group_scale_by_hand():
    # group 0: r = [1, 0, 0, 1] -> mean 0.5, unbiased std sqrt(1/3) = 0.57735
    # group 1: r = [2, 0, 0, 0] -> mean 0.5, unbiased std sqrt(3/3) = 1.0
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    adv, zero = group_advantages(rewards, "group", eps=0.0)
    s = math.sqrt(1 / 3)
    expected = torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(adv, expected)
    assert zero.tolist() == [False, False]
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(2), atol=1e-6, rtol=0)


def test_eps_in_denominator():
    adv, _ = group_advantages(torch.tensor([[0.0, 2.0]]), "group", eps=1e-4)
    # std of [0, 2] = sqrt(2); A = +-1 / (sqrt(2) + 1e-4)
    assert adv[0, 1].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4), rel=1e-6)


def test_zero_variance_groups_get_zero_not_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    for scale in ("group", "batch", "none"):
        adv, zero = group_advantages(rewards, scale)
        assert zero.tolist() == [True, True, False]
        assert torch.equal(adv[:2], torch.zeros(2, 3))
        assert not torch.isnan(adv).any()


def test_batch_scale_uses_one_std():
    rewards = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    # batch std of [1, 0, 4, 0]: mean 1.25, sum sq dev = 0.0625+1.5625+7.5625+1.5625 = 10.75, /3
    std = math.sqrt(10.75 / 3)
    adv, _ = group_advantages(rewards, "batch", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5], [2.0, -2.0]]) / std)


def test_none_scale_is_dr_grpo_centering():
    adv, _ = group_advantages(torch.tensor([[3.0, 1.0, 2.0]]), "none")
    assert adv.tolist() == [[1.0, -1.0, 0.0]]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2, 2), "median")
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))


def test_stats():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    adv, zero = group_advantages(rewards)
    stats = advantage_stats(rewards, adv, zero)
    assert stats["adv/zero_std_frac"] == 0.5
    assert stats["reward/mean"] == 0.75


def test_unscorable_completions_leave_the_baseline_as_in_trl():
    """A completion no reward function applies to (NaN) is excluded from its group's mean and std and gets
    advantage 0 (TRL 1.16: nanmean / nanstd baseline, nan_to_num). Group 0 by hand: scorable [1, 0, 1],
    mean 2/3, unbiased std sqrt(1/3)."""
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.0, nan, 1.0], [nan, nan, nan, nan], [2.0, nan, nan, nan], [0.0, 0.0, 1.0, nan]])
    adv, zero = group_advantages(rewards, "group", eps=0.0)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], torch.tensor([(1 / 3) / s, (-2 / 3) / s, 0.0, (1 / 3) / s]))
    assert zero.tolist() == [False, True, True, False]  # fewer than 2 scorable completions: nothing to compare
    assert torch.equal(adv[1:3], torch.zeros(2, 4)) and adv[3, 3] == 0 and not adv.isnan().any()
    # the old behaviour (NaN as 0) would have given the unscorable completion of group 0 a negative advantage
    as_zero, _ = group_advantages(rewards[:1].nan_to_num(0.0), "group")
    assert as_zero[0, 2] < 0
    # batch scale: one std over the 8 scorable rewards; none: centred only
    valid = rewards[~rewards.isnan()]
    adv_batch, _ = group_advantages(rewards, "batch", eps=0.0)
    torch.testing.assert_close(adv_batch[0, 0], (1 - 2 / 3) / valid.std())
    adv_none, _ = group_advantages(rewards, "none")
    torch.testing.assert_close(adv_none[3], torch.tensor([-1 / 3, -1 / 3, 2 / 3, 0.0]))
    stats = advantage_stats(rewards, adv, zero)
    assert stats["reward/unscorable_frac"] == 9 / 16 and stats["reward/mean"] == pytest.approx(valid.mean().item())
