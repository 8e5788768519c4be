"""grpo_loss and its gradient against a per-token loop written from the formula (DeepSeekMath eq. 3)."""

import math

import pytest
import torch

from grpo_lib.loss import LOSS_TYPES, aggregate_loss, clip_fractions, grpo_loss, k3_kl, microbatch_normalizers


def make_batch(seed=0, N=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(N, T, generator=g) * 3).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(N, T, generator=g)  # ratios far from 1: clipping is active
    ref = logps.detach() + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.tensor([1.5, -0.5, 0.7, -1.7])[:N]
    mask = torch.ones(N, T)
    mask[0, 3:] = 0  # completions of different lengths
    mask[2, 1:] = 0
    return logps, old, ref, adv, mask


def loop_loss(logps, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, L):
    """The objective token by token, written straight from the formula."""
    N, T = logps.shape
    seq_terms, all_terms, n_tokens = [], [], 0
    for i in range(N):
        terms = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logps[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            surrogate = torch.min(ratio * adv[i], clipped * adv[i])
            d = ref[i, t] - logps[i, t]
            kl = torch.exp(d) - d - 1
            terms.append(-(surrogate - beta * kl))
        n_tokens += len(terms)
        seq_terms.append(sum(terms) / len(terms))
        all_terms += terms
    if loss_type == "grpo":
        return sum(seq_terms) / N
    if loss_type in ("bnpo", "dapo"):
        return sum(all_terms) / n_tokens
    return sum(all_terms) / (N * L)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_the_loop(loss_type, eps_high, beta):
    logps, old, ref, adv, mask = make_batch()
    loss, stats = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high,
                            beta=beta, max_completion_length=8)
    (grad,) = torch.autograd.grad(loss, logps)
    logps2 = logps.detach().clone().requires_grad_()
    expected = loop_loss(logps2, old, ref, adv, mask, loss_type, 0.2, eps_high or 0.2, beta, 8)
    (grad2,) = torch.autograd.grad(expected, logps2)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad2, rtol=1e-6, atol=1e-7)
    assert grad[mask == 0].abs().max() == 0  # padding gets no gradient


def test_clip_higher_changes_the_loss():
    logps, old, ref, adv, mask = make_batch()
    a, _ = grpo_loss(logps, old, ref, adv, mask, epsilon=0.2, beta=0.0)
    b, _ = grpo_loss(logps, old, ref, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    assert a.item() != b.item()


def test_on_policy_gradient_is_policy_gradient():
    # mu = 1: old = logp (detached), ratio = 1; grad of the grpo loss wrt logp_it = -A_i / |o_i| / N
    logps, _, _, adv, mask = make_batch()
    loss, stats = grpo_loss(logps, None, None, adv, mask, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / 4
    torch.testing.assert_close(grad, expected)
    assert stats["ratio/mean"] == pytest.approx(1.0)
    assert stats["clip/region"] == 0.0


def test_k3_kl_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    a, b = -torch.rand(50, 7, generator=g) * 5, -torch.rand(50, 7, generator=g) * 5
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(50, 7))
    # by hand: logp = -1, ref = -2: d = -1, exp(-1) + 1 - 1 = 0.36788
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1), rel=1e-6)


def test_k3_kl_is_unbiased_for_kl():
    # E_{x~p}[k3] = KL(p || q) for categorical p, q
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    expected_k3 = (p * k3_kl(p.log(), q.log())).sum()
    kl = (p * (p / q).log()).sum()
    assert expected_k3.item() == pytest.approx(kl.item(), rel=1e-6)


def test_clip_fractions_by_hand():
    ratio = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    adv = torch.tensor([-1.0, 1.0])
    mask = torch.ones(2, 3)
    stats = clip_fractions(ratio, adv, mask, 0.2, 0.2)
    # low: ratio 0.5 with A<0 (row 0) = 1 token; high: ratio 1.5 with A>0 (row 1) = 1 token; of 6
    assert stats == {"clip/low": pytest.approx(1 / 6), "clip/high": pytest.approx(1 / 6),
                     "clip/region": pytest.approx(2 / 6)}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_microbatches_add_up(loss_type):
    logps, old, ref, adv, mask = make_batch()
    full, _ = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, max_completion_length=8)
    parts = []
    for idx in torch.arange(4).chunk(2):
        norm = microbatch_normalizers(loss_type, mask[idx], mask, 2)
        parts.append(grpo_loss(logps[idx], old[idx], ref[idx], adv[idx], mask[idx], loss_type=loss_type,
                               max_completion_length=8, **norm)[0])
    if loss_type == "bnpo":  # TRL: token mean per micro-batch, averaged over micro-batches
        halves = [grpo_loss(logps[i], old[i], ref[i], adv[i], mask[i], loss_type="bnpo")[0]
                  for i in torch.arange(4).chunk(2)]
        full = sum(halves) / 2
    torch.testing.assert_close(sum(parts), full)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(torch.zeros(2, 2), torch.ones(2, 2), "ppo")


def test_beta_needs_reference():
    logps, old, _, adv, mask = make_batch()
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
