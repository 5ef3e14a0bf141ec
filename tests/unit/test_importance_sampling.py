"""Sampler importance-sampling correction, against values worked out by hand.

old = [-1.0, -2.0, -0.5], sampler = [-1.5, -1.0, -0.5], mask = [1, 1, 0]:
log π_old − log μ on loss tokens = [0.5, −1.0, 0] → token ratios [e^0.5, e^−1, 1] = [1.6487, 0.3679, 1];
sequence ratio e^(0.5 − 1.0) = e^−0.5 = 0.6065.
(TRL 1.16 computes these inline in GRPOTrainer._generate_and_score_completions, with no function to call on
tensors; the modes and bounds follow its definitions.)
"""

import math

import pytest
import torch

from reinforge.algorithms.importance_sampling import sampler_importance_weights, sampler_metrics
from reinforge.algorithms.policy_losses import policy_loss_terms

OLD = torch.tensor([[-1.0, -2.0, -0.5]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5]])
MASK = torch.tensor([[1, 1, 0]])
E = math.exp


@pytest.mark.parametrize("mode,cap_max,cap_min,expected", [
    ("token_truncate", 1.5, None, [[1.5, E(-1), 1.0]]),
    ("token_truncate", 1.5, 0.5, [[1.5, 0.5, 1.0]]),
    ("token_truncate", None, None, [[E(0.5), E(-1), 1.0]]),
    ("token_mask", 1.5, None, [[0.0, E(-1), 1.0]]),  # masked to 0, not to 1/cap (Axolotl)
    ("token_mask", 1.5, 0.5, [[0.0, 0.0, 1.0]]),
    ("sequence_truncate", 0.5, None, [[0.5]]),
    ("sequence_truncate", 3.0, None, [[E(-0.5)]]),
    ("sequence_mask", 0.5, None, [[0.0]]),
    ("sequence_mask", 3.0, None, [[E(-0.5)]]),
])
def test_weights_by_hand(mode, cap_max, cap_min, expected):
    out = sampler_importance_weights(OLD, SAMPLER, MASK, mode=mode, cap_max=cap_max, cap_min=cap_min)
    assert torch.allclose(out.weights, torch.tensor(expected), atol=1e-6), out.weights
    assert torch.allclose(out.log_diff, torch.tensor([[0.5, -1.0, 0.0]]))


def test_unknown_sampler_logprob_means_no_correction():
    sampler = torch.tensor([[float("nan"), -1.0, -0.5]])
    out = sampler_importance_weights(OLD, sampler, MASK, mode="token_truncate", cap_max=3.0)
    assert torch.allclose(out.weights, torch.tensor([[1.0, E(-1), 1.0]]))


def test_metrics_by_hand():
    out = sampler_importance_weights(OLD, SAMPLER, MASK, mode="token_truncate", cap_max=1.5)
    m = sampler_metrics(out, OLD, SAMPLER, MASK)
    assert m["sampling/sampling_logp_difference/mean"].item() == pytest.approx(0.75)
    assert m["sampling/sampling_logp_difference/max"].item() == pytest.approx(1.0)
    assert m["sampling/importance_sampling_ratio/min"].item() == pytest.approx(E(-1))
    assert m["sampling/importance_sampling_ratio/mean"].item() == pytest.approx((1.5 + E(-1)) / 2)
    assert m["sampling/importance_sampling_ratio/max"].item() == pytest.approx(1.5)
    seq = sampler_importance_weights(OLD, SAMPLER, MASK, mode="sequence_truncate", cap_max=3.0)
    assert sampler_metrics(seq, OLD, SAMPLER, MASK)["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(E(-0.5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be one of"):
        sampler_importance_weights(OLD, SAMPLER, MASK, mode="token", cap_max=3.0)
    with pytest.raises(ValueError, match="cap_min"):
        sampler_importance_weights(OLD, SAMPLER, MASK, mode="token_mask", cap_max=1.0, cap_min=2.0)


def test_weights_scale_the_surrogate_before_the_kl_term():
    """L = −ρ·min(r·A, clip(r)·A) + β·KL: with r = 1 (on-policy) the surrogate is −A per token, so the loss is
    −ρ·A + β·KL; the gradient of the surrogate part scales by ρ too."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -2.0]])
    rho = torch.tensor([[2.0, 0.5]])
    adv = torch.tensor([1.5])
    terms = policy_loss_terms(logps, adv, torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.2, beta=0.1,
                                ref_per_token_logps=ref, sampler_weights=rho)
    assert torch.allclose(terms.per_token_loss, torch.tensor([[-3.0, -0.75]]))  # KL is 0 at ref == policy
    terms.per_token_loss.sum().backward()
    assert torch.allclose(logps.grad, torch.tensor([[-3.0, -0.75]]))  # d(−ρ·A·exp(lp − lp.detach()))/dlp = −ρ·A
