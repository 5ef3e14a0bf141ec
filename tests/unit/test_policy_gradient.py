"""Clipped surrogate, GSPO sequence ratio, k3 KL, clip-ratio metrics and entropy: by hand and
against TRL 1.16 (GRPOTrainer._compute_loss run on a stand-in object; trl.trainer.utils)."""

from __future__ import annotations

import math

import pytest
import torch

from reinforge.algorithms.aggregation import aggregate_loss
from reinforge.algorithms.logprobs import entropy_from_logits
from reinforge.algorithms.policy_losses import policy_loss_terms

from test_policy_losses import trl_compute_loss
from reinforge.algorithms.policy_gradient import (
    clip_ratio_metrics,
    clipped_surrogate_loss,
    k3_kl,
    log_importance_weights,
    masked_mean,
)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed values


def test_clipped_surrogate_by_hand():
    # ratios: 0.5/0.4 = 1.25 (above 1+0.2) and 0.35/0.5 = 0.7 (below 1-0.2)
    log_ratio = t([[math.log(0.5 / 0.4), math.log(0.35 / 0.5)]] * 2)
    adv = t([1.0, -1.0])
    loss = clipped_surrogate_loss(log_ratio, adv, 0.2, 0.2)
    # A=+1: r=1.25 → min(1.25, 1.2) = 1.2 → -1.2;   r=0.7 → min(0.7, 0.8) = 0.7 → -0.7
    # A=-1: r=1.25 → min(-1.25, -1.2) = -1.25 → 1.25;  r=0.7 → min(-0.7, -0.8) = -0.8 → 0.8
    assert loss.tolist() == [pytest.approx([-1.2, -0.7]), pytest.approx([1.25, 0.8])]
    # DAPO clip-higher: eps_high 0.28 lets r = 1.25 through for A = +1
    assert clipped_surrogate_loss(log_ratio, adv, 0.2, 0.28)[0, 0].item() == pytest.approx(-1.25)


def test_gradient_is_zero_where_clipped():
    logps = t([[math.log(0.5), math.log(0.35), math.log(0.3)]]).requires_grad_()
    old = t([[math.log(0.4), math.log(0.5), math.log(0.3)]])
    mask = t([[1, 1, 1]])
    terms = policy_loss_terms(logps, t([1.0]), mask, epsilon_low=0.2, epsilon_high=0.2, old_per_token_logps=old)
    terms.per_token_loss.sum().backward()
    # token 1: r=1.25, A=+1 → clipped (constant 1.2) → grad 0
    # token 2: r=0.7, A=+1 → unclipped loss -r·A, d/dlogp = -r = -0.7
    # token 3: r=1 → -1
    assert logps.grad.tolist() == [pytest.approx([0.0, -0.7, -1.0])]
    assert terms.ratio.tolist() == [pytest.approx([1.25, 0.7, 1.0])]
    assert terms.per_token_kl is None


def test_on_policy_default_old_logps():
    # old_per_token_logps=None: ratio 1 in value, gradient of the loss = -A per token
    logps = t([[-1.0, -2.0]]).requires_grad_()
    terms = policy_loss_terms(logps, t([0.5]), t([[1, 1]]), epsilon_low=0.2, epsilon_high=0.2)
    assert terms.per_token_loss.tolist() == [[-0.5, -0.5]]
    terms.per_token_loss.sum().backward()
    assert logps.grad.tolist() == [[-0.5, -0.5]]


def test_sequence_ratio_by_hand():
    # GSPO: log s = mean over unmasked tokens of (logp - old): (0.1 + 0.3)/2 = 0.2; the masked 5.0 is ignored
    logps = t([[0.1, 0.3, 5.0], [0.0, 0.0, 0.0]])
    old = torch.zeros_like(logps)
    mask = t([[1, 1, 0], [0, 0, 0]])
    w = log_importance_weights(logps, old, mask, "sequence")
    assert w.shape == (2, 1)
    assert w[0, 0].item() == pytest.approx(0.2) and w[1, 0].item() == 0.0  # empty row: 0 / clamp(0, 1)
    terms = policy_loss_terms(logps, t([1.0, 1.0]), mask, epsilon_low=0.2, epsilon_high=0.3,
                                old_per_token_logps=old, importance_sampling_level="sequence")
    # s = e^0.2 = 1.2214 < 1.3 → unclipped: loss -1.2214 for the whole sequence ([B, 1])
    assert terms.per_token_loss.shape == (2, 1)
    assert terms.per_token_loss[0, 0].item() == pytest.approx(-math.exp(0.2))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        log_importance_weights(logps, old, mask, "seq")


def test_k3_kl_by_hand():
    # π=0.5, π_ref=0.25: Δ = log(0.25/0.5) = -log 2; k3 = e^Δ - Δ - 1 = 0.5 + log 2 - 1
    kl = k3_kl(t([math.log(0.5), math.log(0.3)]), t([math.log(0.25), math.log(0.3)]))
    assert kl.tolist() == pytest.approx([0.5 + math.log(2.0) - 1.0, 0.0])


def test_kl_added_with_beta():
    logps = t([[math.log(0.5)]])
    ref = t([[math.log(0.25)]])
    terms = policy_loss_terms(logps, t([2.0]), t([[1]]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                                ref_per_token_logps=ref)
    # on-policy: -1·2 + 0.1·(0.5 + log 2 - 1)
    assert terms.per_token_loss.item() == pytest.approx(-2.0 + 0.1 * (math.log(2.0) - 0.5))
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        policy_loss_terms(logps, t([2.0]), t([[1]]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1)


def test_clip_ratio_metrics_by_hand():
    ratio = t([[0.5, 1.0, 1.5, 0.5], [1.5, 1.5, 0.5, 1.0]])
    adv = t([-1.0, 1.0])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    m = clip_ratio_metrics(ratio, adv, mask, 0.2, 0.2)
    # row 1 (A<0): low-clipped where r < 0.8 → token 1 only (token 4 masked); high needs A>0 → none
    # row 2 (A>0): high-clipped where r > 1.2 → tokens 1, 2; low needs A<0 → none
    # 7 unmasked tokens: low 1/7, high 2/7, region 3/7
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 7)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(2 / 7)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(3 / 7)
    # per-sequence: low (1/3, 0/4) → min 0; high (0/3, 2/4) → max 0.5
    assert m["clip_ratio/low_min"].item() == 0.0
    assert m["clip_ratio/high_max"].item() == pytest.approx(0.5)


def test_masked_mean_by_hand():
    assert masked_mean(t([[1.0, 2.0, 9.0]]), t([[1, 1, 0]])).item() == 1.5
    assert masked_mean(t([[2.0], [4.0]]), t([[1, 0], [0, 0]])).item() == 3.0  # per-sequence values


def test_entropy_by_hand_and_against_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    logits = t([[0.0, 0.0], [0.0, math.log(3.0)]])
    # uniform over 2: log 2; probs (1/4, 3/4): -(1/4 log 1/4 + 3/4 log 3/4)
    expected = [math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert entropy_from_logits(logits).tolist() == pytest.approx(expected)
    x = torch.randn(3, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(entropy_from_logits(x, chunk_size=4), trl_entropy(x, chunk_size=4), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- against TRL 1.16


def _batch(seed=0, b=4, t_len=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t_len, generator=g, dtype=torch.float64) * 2
    old = logps + (torch.rand(b, t_len, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios ~ e^±0.4
    old = old + torch.tensor([-0.3, 0.3, 0.0, 0.3], dtype=torch.float64)[:b, None]  # clip some sequence ratios too
    ref = logps + (torch.rand(b, t_len, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.ones(b, t_len, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64)[:b]
    entropies = torch.rand(b, t_len, generator=g, dtype=torch.float64)
    return logps, old, ref, mask, adv, entropies


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_per_token_loss_and_metrics_match_trl(level, beta):
    logps, old, ref, mask, adv, entropies = _batch()
    b, t_len = logps.shape
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones(b, t_len, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }
    trl_logps = logps.clone().requires_grad_()
    trl_loss, trl_metrics = trl_compute_loss(trl_logps, entropies, inputs, loss_type="bnpo", beta=beta, level=level,
                                             eps_low=0.2, eps_high=0.28, max_completion_length=t_len)
    trl_loss.backward()

    our_logps = logps.clone().requires_grad_()
    terms = policy_loss_terms(our_logps, adv, mask, epsilon_low=0.2, epsilon_high=0.28, old_per_token_logps=old,
                                importance_sampling_level=level, beta=beta, ref_per_token_logps=ref)
    loss = aggregate_loss(terms.per_token_loss, mask, "bnpo")
    loss.backward()
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, atol=1e-6, rtol=0)

    ours = {k: v.item() for k, v in clip_ratio_metrics(terms.ratio, adv, mask, 0.2, 0.28).items()}
    ours["entropy"] = masked_mean(entropies, mask).item()
    if beta:
        ours["kl"] = masked_mean(terms.per_token_kl, mask).item()
    assert set(ours) == set(trl_metrics)
    for name, value in trl_metrics.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    # the batch must exercise clipping for the comparison to mean something
    assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
