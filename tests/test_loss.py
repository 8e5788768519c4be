"""grpo_loss and its gradient against a per-token loop written from the formula (DeepSeekMath eq. 3), and its
variants: GSPO's sequence ratio, CISPO's clipped weight, truncated completions masked, high-entropy tokens only."""

import math

import pytest
import torch

from grpo_lib.config import ConfigError, GRPOConfig
from grpo_lib.loss import (LOSS_TYPES, aggregate_loss, cispo_clip_fraction, clip_fractions, grpo_loss,
                           high_entropy_mask, k3_kl, mask_truncated_completions, microbatch_normalizers, sequence_ratio)


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


def loop_loss(logps, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, L, level="token", keep=None):
    """The objective token by token, written straight from the formulas: PPO's clipped surrogate, or CISPO's
    sg(min(rho, eps_high)) A logp; rho per token, or GSPO's s_i = exp(mean_t (logp - old)) for the sequence;
    the policy term only where `keep` (high-entropy tokens); a row without tokens adds nothing."""
    N, T = logps.shape
    seq_terms, all_terms, n_tokens = [], [], 0
    for i in range(N):
        tokens = [t for t in range(T) if mask[i, t] != 0]
        if level == "sequence" and tokens:
            s_i = torch.exp(sum(logps[i, t] - old[i, t] for t in tokens) / len(tokens))
        terms = []
        for t in tokens:
            ratio = s_i if level == "sequence" else torch.exp(logps[i, t] - old[i, t])
            if loss_type == "cispo":
                policy = min(ratio.item(), eps_high) * adv[i] * logps[i, t]
            else:
                clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
                policy = torch.min(ratio * adv[i], clipped * adv[i])
            if keep is not None and not keep[i, t]:
                policy = 0.0
            d = ref[i, t] - logps[i, t]
            kl = torch.exp(d) - d - 1
            terms.append(-(policy - beta * kl))
        n_tokens += len(terms)
        seq_terms.append(sum(terms) / max(len(terms), 1))
        all_terms += terms
    if loss_type == "grpo":
        return sum(seq_terms) / N
    if loss_type in ("bnpo", "dapo", "cispo"):
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


# ----------------------------------------------------------------------------------------------
# GSPO: one importance ratio per sequence (importance_sampling_level="sequence")
# ----------------------------------------------------------------------------------------------


def gspo_batch():
    """Sequence ratios chosen to cover every branch of the clip (eps 0.2): row 0 s~1.65 with A > 0 and row 1
    s~0.61 with A < 0 are clipped; row 2 s~1.05 is inside; row 3 s~1.35 with A < 0 keeps the unclipped term.
    Padding holds absurd old log-probs: the sequence ratio must not read them."""
    logps, _, ref, adv, mask = make_batch()
    noise = 0.05 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(7))
    old = logps.detach() - torch.tensor([0.5, -0.5, 0.05, 0.3])[:, None] + noise
    old = old.masked_fill(mask == 0, 100.0)
    return logps, old, ref, adv, mask


def test_sequence_ratio_is_the_length_normalised_likelihood_ratio():
    logps, old, _, _, mask = gspo_batch()
    s = sequence_ratio(logps, old, mask)
    assert s.shape == (4, 1)
    for i in range(4):
        real = mask[i].bool()
        # (pi(o_i) / pi_old(o_i))^(1/|o_i|): the sequence likelihood ratio, |o_i|-th root
        likelihood_ratio = torch.exp(logps[i, real].sum() - old[i, real].sum())
        assert s[i, 0].item() == pytest.approx(likelihood_ratio.item() ** (1 / real.sum().item()), rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_and_gradient_match_the_loop(loss_type, beta):
    logps, old, ref, adv, mask = gspo_batch()
    eps_high = 5.0 if loss_type == "cispo" else 0.2
    loss, stats = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high,
                            beta=beta, max_completion_length=8, importance_sampling_level="sequence")
    (grad,) = torch.autograd.grad(loss, logps)
    logps2 = logps.detach().clone().requires_grad_()
    expected = loop_loss(logps2, old, ref, adv, mask, loss_type, 0.2, eps_high, beta, 8, level="sequence")
    (grad2,) = torch.autograd.grad(expected, logps2)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad2, rtol=1e-5, atol=1e-7)
    assert grad[mask == 0].abs().max() == 0


def test_gspo_gradient_by_hand():
    """grpo aggregation, beta = 0: loss = -(1/N) sum_i min(s_i A_i, clip(s_i) A_i), and d s_i / d logp_it =
    s_i m_it / |o_i|, so grad_it = -A_i s_i m_it / (N |o_i|) where the unclipped term is the min, else 0."""
    logps, old, ref, adv, mask = gspo_batch()
    loss, stats = grpo_loss(logps, old, None, adv, mask, beta=0.0, importance_sampling_level="sequence")
    (grad,) = torch.autograd.grad(loss, logps)
    lengths = mask.sum(1)
    s = torch.exp(((logps.detach() - old) * mask).sum(1) / lengths)
    active = ~(((s > 1.2) & (adv > 0)) | ((s < 0.8) & (adv < 0)))
    assert active.tolist() == [False, False, True, True]  # both branches of the clip are exercised
    expected = -(adv * s * active / (4 * lengths))[:, None] * mask
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    # the clip fractions count each clipped sequence's tokens: rows 0 (3 tokens, high) and 1 (5, low) of 14
    assert stats["clip/high"] == pytest.approx(3 / 14) and stats["clip/low"] == pytest.approx(5 / 14)


def test_gspo_on_policy_gradient_equals_grpo():
    """mu = 1: s_i = 1 and d s_i / d logp_it = 1/|o_i|: the same policy gradient as the token-level ratio."""
    logps, _, _, adv, mask = make_batch()
    grads = []
    for level in ("token", "sequence"):
        loss, _ = grpo_loss(logps, None, None, adv, mask, beta=0.0, importance_sampling_level=level)
        grads.append(torch.autograd.grad(loss, logps)[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_unknown_importance_sampling_level():
    logps, old, _, adv, mask = make_batch()
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, old, None, adv, mask, beta=0.0, importance_sampling_level="group")


# ----------------------------------------------------------------------------------------------
# CISPO: the importance weight clipped (above) and detached, never the update
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_max", [1.1, 5.0])
def test_cispo_loss_and_gradient(beta, eps_max):
    logps, old, ref, adv, mask = make_batch()
    loss, stats = grpo_loss(logps, old, ref, adv, mask, loss_type="cispo", epsilon=0.2, epsilon_high=eps_max,
                            beta=beta)
    (grad,) = torch.autograd.grad(loss, logps)
    logps2 = logps.detach().clone().requires_grad_()
    expected = loop_loss(logps2, old, ref, adv, mask, "cispo", 0.2, eps_max, beta, None)
    (grad2,) = torch.autograd.grad(expected, logps2)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad2, rtol=1e-6, atol=1e-7)
    # by hand (beta = 0): the weight is a constant, so grad_it = -min(rho_it, eps_max) A_i m_it / sum(m); only
    # the upper side is clipped: rho < 1 - eps keeps its weight (PPO's clip would zero that gradient for A < 0)
    rho = torch.exp(logps.detach() - old)
    weight = rho.clamp(max=eps_max)
    if beta == 0.0:
        torch.testing.assert_close(grad, -weight * adv[:, None] * mask / mask.sum(), rtol=1e-6, atol=1e-8)
    real = mask.bool()
    assert (rho[real] < 0.8).any() and ((rho[real] > 1.1).any())  # both sides of a PPO clip occur in the batch
    expected_clipped = ((rho > eps_max) & (adv[:, None] > 0) & real).sum() / real.sum()
    assert stats["clip/cispo"] == pytest.approx(expected_clipped.item())
    assert "clip/region" not in stats


def test_cispo_clip_fraction_by_hand():
    ratio = torch.tensor([[0.5, 1.0, 6.0], [0.5, 7.0, 6.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # rho > 5 with A > 0: only (0, 2); (1, 1) has A < 0 and (1, 2) is padding
    assert cispo_clip_fraction(ratio, adv, mask, 5.0) == {"clip/cispo": pytest.approx(1 / 5)}


def test_cispo_on_policy_is_the_policy_gradient_with_dapo_normaliser():
    logps, _, _, adv, mask = make_batch()
    cispo, _ = grpo_loss(logps, None, None, adv, mask, loss_type="cispo", epsilon_high=5.0, beta=0.0)
    dapo, _ = grpo_loss(logps, None, None, adv, mask, loss_type="dapo", beta=0.0)
    torch.testing.assert_close(torch.autograd.grad(cispo, logps)[0], torch.autograd.grad(dapo, logps)[0])


# ----------------------------------------------------------------------------------------------
# mask_truncated_completions: truncated rows leave the loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_truncated_completions_contribute_nothing(loss_type):
    logps, old, ref, adv, mask = make_batch()
    truncated = torch.tensor([False, True, False, True])
    loss_mask = mask_truncated_completions(mask, truncated)
    assert loss_mask[[1, 3]].sum() == 0 and torch.equal(loss_mask[[0, 2]], mask[[0, 2]])
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high, beta=0.04, max_completion_length=8)
    loss, stats = grpo_loss(logps, old, ref, adv, loss_mask, **kw)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad[truncated].abs().max() == 0 and grad[~truncated].abs().max() > 0
    assert stats["tokens"] == loss_mask.sum().item()
    logps2 = logps.detach().clone().requires_grad_()
    expected = loop_loss(logps2, old, ref, adv, loss_mask, loss_type, 0.2, eps_high, 0.04, 8)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logps2)[0], rtol=1e-6, atol=1e-7)
    # the kept rows alone: the same loss for the token means; grpo and dr_grpo still count every row in N (TRL)
    keep = ~truncated
    alone, _ = grpo_loss(logps[keep], old[keep], ref[keep], adv[keep], mask[keep], **kw)
    scale = 0.5 if loss_type in ("grpo", "dr_grpo") else 1.0
    torch.testing.assert_close(loss, scale * alone)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_microbatches_add_up_with_truncated_completions_masked(loss_type):
    logps, old, ref, adv, mask = make_batch()
    loss_mask = mask_truncated_completions(mask, torch.tensor([False, False, True, False]))
    kw = dict(loss_type=loss_type, max_completion_length=8, epsilon_high=5.0 if loss_type == "cispo" else None)
    full, _ = grpo_loss(logps, old, ref, adv, loss_mask, **kw)
    parts = [grpo_loss(logps[i], old[i], ref[i], adv[i], loss_mask[i], **kw,
                       **microbatch_normalizers(loss_type, loss_mask[i], loss_mask, 2))[0]
             for i in torch.arange(4).chunk(2)]
    if loss_type == "bnpo":
        full = sum(grpo_loss(logps[i], old[i], ref[i], adv[i], loss_mask[i], **kw)[0]
                   for i in torch.arange(4).chunk(2)) / 2
    torch.testing.assert_close(sum(parts), full)


# ----------------------------------------------------------------------------------------------
# top_entropy_quantile: the policy term only on the high-entropy tokens
# ----------------------------------------------------------------------------------------------

# real tokens' entropies 0.1 .. 1.1 (6 tokens); padding holds 9.0, which must neither be kept nor move the quantile
ENTROPIES = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.3, 1.1, 0.7, 9.0]])
ENTROPY_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])


@pytest.mark.parametrize("rho,kept", [
    (1.0, [0.1, 0.3, 0.5, 0.7, 0.9, 1.1]),
    (0.5, [0.7, 0.9, 1.1]),  # Q_0.5 of the sorted six: position 0.5 * 5 = 2.5 -> 0.5 + 0.5 * (0.7 - 0.5) = 0.6
    (0.3, [0.9, 1.1]),  # Q_0.7: position 3.5 -> 0.8
    (0.1, [1.1]),  # Q_0.9: position 4.5 -> 1.0
    (0.0, [1.1]),  # Q_1 = the largest, kept (at or above): only the highest-entropy token
])
def test_high_entropy_mask_keeps_the_expected_tokens(rho, kept):
    keep = high_entropy_mask(ENTROPIES, ENTROPY_MASK, rho)
    assert sorted(ENTROPIES[keep].tolist()) == pytest.approx(kept)
    assert not keep[:, 3].any()  # padding never


def test_high_entropy_mask_equals_trl():
    trl_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

    class OneProcess:  # what get_high_entropy_mask needs of accelerate, for a single process
        pad_across_processes = staticmethod(lambda t, dim, pad_index: t)
        gather = staticmethod(lambda t: t)

    fake = type("FakeTrainer", (), {"accelerator": OneProcess()})()
    g = torch.Generator().manual_seed(3)
    entropies, mask = torch.rand(6, 9, generator=g) * 3, (torch.rand(6, 9, generator=g) > 0.3).long()
    for rho in (0.0, 0.1, 0.2, 0.5, 0.9, 1.0):
        theirs = trl_trainer.GRPOTrainer.get_high_entropy_mask(fake, entropies, mask, 1 - rho)
        assert torch.equal(high_entropy_mask(entropies, mask, rho), theirs), rho


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_top_entropy_quantile_loss_and_gradient(loss_type, beta):
    logps, old, ref, adv, mask = make_batch()
    entropies = torch.rand(mask.shape, generator=torch.Generator().manual_seed(11))
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    loss, _ = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high,
                        beta=beta, max_completion_length=8, entropies=entropies, top_entropy_quantile=0.3)
    (grad,) = torch.autograd.grad(loss, logps)
    # the 0.7-quantile of the 14 real tokens' entropies by linear interpolation: position 0.7 * 13 = 9.1
    ordered = sorted(entropies[mask.bool()].tolist())
    threshold = ordered[9] + 0.1 * (ordered[10] - ordered[9])
    keep = (entropies >= threshold) & mask.bool()
    assert keep.sum() == 4  # ranks 10..13: the top 30% of the tokens, rounded down
    logps2 = logps.detach().clone().requires_grad_()
    expected = loop_loss(logps2, old, ref, adv, mask, loss_type, 0.2, eps_high, beta, 8, keep=keep)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logps2)[0], rtol=1e-6, atol=1e-7)
    if beta == 0.0:  # only kept tokens get a gradient (unless the PPO clip removes it); with the KL term all do
        assert grad[~keep].abs().max() == 0 and grad[keep].abs().max() > 0


def test_top_entropy_quantile_needs_entropies():
    logps, old, _, adv, mask = make_batch()
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(logps, old, None, adv, mask, beta=0.0, top_entropy_quantile=0.2)


# ----------------------------------------------------------------------------------------------
# the config fields of the variants
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    (dict(loss_type="cispo"), "epsilon_high=None is invalid: loss_type='cispo' caps the importance weight"),
    (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high=0.28 is invalid: .* set it >= 1, e.g. 5.0"),
    (dict(importance_sampling_level="group"), "importance_sampling_level='group' is invalid: choose one of"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile=1.5 is invalid: must be in \\[0, 1\\]"),
    (dict(top_entropy_quantile=-0.1), "top_entropy_quantile=-0.1 is invalid"),
    (dict(mask_truncated_completions="yes"), "mask_truncated_completions='yes' has type str; expected bool"),
])
def test_variant_config_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**changes)


def test_variant_config_defaults_are_grpo():
    c = GRPOConfig(loss_type="cispo", epsilon_high=5.0, importance_sampling_level="sequence",
                   mask_truncated_completions=True, top_entropy_quantile=0.2)
    assert c.top_entropy_quantile == 0.2
    d = GRPOConfig()
    assert (d.importance_sampling_level, d.mask_truncated_completions, d.top_entropy_quantile) == ("token", False, 1.0)


def test_loss_kwargs_carry_every_loss_knob_of_the_config():
    from grpo_lib.loss import loss_kwargs

    c = GRPOConfig(loss_type="dapo", epsilon=0.1, epsilon_high=0.3, beta=0.02, max_completion_length=40,
                   importance_sampling_level="sequence", top_entropy_quantile=0.5)
    assert loss_kwargs(c) == {"loss_type": "dapo", "epsilon": 0.1, "epsilon_high": 0.3, "beta": 0.02,
                              "max_completion_length": 40, "importance_sampling_level": "sequence",
                              "top_entropy_quantile": 0.5}


def test_gradient_weights_by_hand():
    """Two completions of 2 and 4 tokens, A = (+1, -1), at rho = 1: the weights of the aggregation table."""
    from grpo_lib.loss import gradient_weights

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    logps = torch.full((2, 4), -1.0)
    adv = torch.tensor([1.0, -1.0])
    expected = {"grpo": (1 / (2 * 2), -1 / (2 * 4)),  # A_i / (N |o_i|)
                "dapo": (1 / 6, -1 / 6),  # A_i / sum_j |o_j|, 6 tokens
                "dr_grpo": (1 / 16, -1 / 16)}  # A_i / (N L_max), L_max = 8
    for loss_type, (w_short, w_long) in expected.items():
        w = gradient_weights(logps, logps, adv, mask, loss_type=loss_type, max_completion_length=8, beta=0.04)
        want = torch.tensor([[w_short, w_short, 0, 0], [w_long] * 4])
        assert torch.allclose(w, want, atol=1e-7), loss_type


def test_gradient_weights_drop_the_clipped_token():
    """A token whose ratio e^0.5 = 1.65 is above 1 + 0.2 with A > 0 gets no gradient; its sibling keeps 1/(1*2)."""
    from grpo_lib.loss import gradient_weights

    mask = torch.tensor([[1, 1]])
    old = torch.tensor([[-2.0, -2.0]])
    new = torch.tensor([[-1.5, -2.0]])
    w = gradient_weights(new, old, torch.tensor([1.0]), mask, loss_type="grpo", epsilon=0.2)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5]]))  # the unclipped one: rho = 1, A / |o| = 1/2
