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


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_weights_from_the_training_forward_equal_a_separate_old_forward(mode):
    """On-policy rollouts leave the weights to the loss (RolloutBatch.correction): π_old is the training forward's
    own detached log-probs. Same loss, gradient and sampling metrics as weights computed beforehand from an
    old-policy forward of the same weights."""
    from reinforge.rollout.prepare import RolloutBatch, SamplerCorrectionSpec
    from reinforge.training.online_objective import PolicyGradientObjective

    g = torch.Generator().manual_seed(0)
    n_tokens = torch.tensor([3, 2, 4])
    flat = -torch.rand(9, generator=g, dtype=torch.float64)
    padded = torch.tensor([[0, 1, 2, -1], [3, 4, -1, -1], [5, 6, 7, 8]])
    mask = padded >= 0
    old = torch.where(mask, flat[padded.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    sampler = old + (torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.5) * 0.6
    spec = SamplerCorrectionSpec(mode, 2.0, None)
    adv = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    objective = PolicyGradientObjective(epsilon_low=0.2, epsilon_high=0.2, beta=0.0, importance_sampling_level="token",
                                        loss_type="dapo", max_completion_length=4, gradient_accumulation_steps=1)

    def run(mb):
        logps = flat.clone().requires_grad_()
        loss, metrics = objective({"token_logps": logps, "token_entropy": torch.zeros(9, dtype=torch.float64)}, mb, 9.0)
        loss.backward()
        return loss, logps.grad, metrics

    batch = {"n_tokens": n_tokens}
    corr = sampler_importance_weights(old, sampler, mask, mode=mode, cap_max=2.0)
    ahead = run(RolloutBatch(batch, mask, adv, old, None, {}, sampler_weights=corr.weights, sampler_logps=sampler))
    deferred = run(RolloutBatch(batch, mask, adv, None, None, {}, sampler_logps=sampler, correction=spec))
    torch.testing.assert_close(deferred[0], ahead[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(deferred[1], ahead[1], atol=1e-12, rtol=0)
    for name, value in sampler_metrics(corr, old, sampler, mask).items():
        assert deferred[2][name].item() == pytest.approx(value.item(), abs=1e-12), name
    assert corr.weights.min() < 1.0 < corr.weights.max() or mode.startswith("sequence")
