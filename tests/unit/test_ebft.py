"""EBFT's pure functions against values worked out by hand: layer indices, pooling, whitening, the feature-matching
rewards (arXiv 2603.12248 eq. 7) with the CFM loss (eq. 2), the advantage estimators, the adaptive length cap, and
the multi-turn dataset transforms."""

import math

import pytest
import torch

from reinforge.algorithms.ebft import (feature_layer_indices, feature_matching_rewards, group_advantages,
                                       pool_features, whitening_matrix)
from reinforge.rollout.feature_rewards import adaptive_max_tokens


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_layer_indices():
    assert feature_layer_indices([0.25, 0.5, 0.75], 30) == [7, 15, 22]
    assert feature_layer_indices([0.0, 1.0], 4) == [0, 4]  # 0: the embeddings; L: the last layer
    with pytest.raises(ValueError):
        feature_layer_indices([1.5], 4)


def test_pooling_by_hand():
    hidden = t([[[1.0], [2.0], [3.0], [4.0]]])  # the 4th position is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pool_features(hidden, mask, "last_token").item() == 3.0
    assert pool_features(hidden, mask, "mean_pooling").item() == 2.0
    assert pool_features(hidden, mask, "completion_mean", torch.tensor([1])).item() == 2.5  # (2 + 3) / 2
    assert pool_features(hidden, mask, "concat").tolist() == [[1.0, 2.0, 3.0]]  # len 3: positions 0, 1, 2
    with pytest.raises(ValueError):
        pool_features(hidden, mask, "completion_mean")


def test_rewards_orthogonal_samples_by_hand():
    # g1 = (1, 0), g2 = (0, 1), gt = (1, 1)/√2: cos = 1/√2 for both → alignment 2/√2 = √2; g1·g2 = 0
    out = feature_matching_rewards(t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 1.0]]), 2, alignment_coef=1.0,
                                   diversity_coef=1.0, whiten=False)
    assert out.alignment.tolist() == pytest.approx([math.sqrt(2)] * 2)
    assert out.diversity.tolist() == pytest.approx([0.0, 0.0])
    assert out.rewards.tolist() == pytest.approx([math.sqrt(2)] * 2)
    # mean g = (½, ½), gt = (1/√2, 1/√2): ‖·‖² = 2 (½ − 1/√2)²
    assert out.cfm_loss.item() == pytest.approx(2 * (0.5 - 1 / math.sqrt(2)) ** 2)


def test_rewards_with_diversity_by_hand():
    # normalised: g1 = (0.6, 0.8), g2 = (1, 0), gt = (0, 1); α = 1, β = 0.5
    # alignment 2·0.8 = 1.6 and 0; diversity 2·(g1·g2)/(n−1) = 2·0.6 = 1.2 each; r = 1.6 − 0.6, 0 − 0.6
    out = feature_matching_rewards(t([[3.0, 4.0], [1.0, 0.0]]), t([[0.0, 2.0]]), 2, alignment_coef=1.0,
                                   diversity_coef=0.5, whiten=False)
    assert out.alignment.tolist() == pytest.approx([1.6, 0.0])
    assert out.diversity.tolist() == pytest.approx([1.2, 1.2])
    assert out.rewards.tolist() == pytest.approx([1.0, -0.6])
    assert out.cfm_loss.item() == pytest.approx(0.8 ** 2 + 0.6 ** 2)  # mean (0.8, 0.4) vs (0, 1)


def test_diversity_over_three_samples_and_two_groups():
    # group 0: (1,0), (0,1), (1,0): sums of dot products with the others 1, 0, 1 → 2·s/2 = 1, 0, 1
    gen = t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    out = feature_matching_rewards(gen, t([[1.0, 0.0], [0.0, 1.0]]), 3, alignment_coef=1.0, diversity_coef=1.0,
                                   whiten=False)
    assert out.diversity.tolist() == pytest.approx([1.0, 0.0, 1.0, 2.0, 2.0, 2.0])  # group 1: identical samples
    assert out.alignment.tolist() == pytest.approx([2.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    assert out.cfm_loss.tolist() == pytest.approx([(2 / 3 - 1) ** 2 + (1 / 3) ** 2, 0.0])


def test_whitening_by_hand():
    # featuresᵀ = diag(2, 1): U = I, s = (2, 1) → W = diag(½, 1)
    assert torch.allclose(whitening_matrix(t([[2.0, 0.0], [0.0, 1.0]])), t([[0.5, 0.0], [0.0, 1.0]]))
    # rank 1: featuresᵀ = [[1, 2], [0, 0]], s = (√5, 0): the zero direction is dropped → W = diag(1/√5, 0)
    assert torch.allclose(whitening_matrix(t([[1.0, 0.0], [2.0, 0.0]])), t([[1 / math.sqrt(5), 0.0], [0.0, 0.0]]))
    # whitened samples (1, 0), (0, 1); ground truth (2, 2) → (1, 2): cos 1/√5 and 2/√5; dot product 0
    out = feature_matching_rewards(t([[2.0, 0.0], [0.0, 1.0]]), t([[2.0, 2.0]]), 2, alignment_coef=1.0,
                                   diversity_coef=1.0, whiten=True)
    assert out.alignment.tolist() == pytest.approx([2 / math.sqrt(5), 4 / math.sqrt(5)])
    assert out.diversity.tolist() == pytest.approx([0.0, 0.0])
    assert out.cfm_loss.item() == pytest.approx(0.5 ** 2 + 1.5 ** 2)  # mean (½, ½) vs (1, 2)


def test_reward_errors():
    with pytest.raises(ValueError):
        feature_matching_rewards(t([[1.0, 0.0]]), t([[1.0, 0.0]]), 1, alignment_coef=1, diversity_coef=1, whiten=False)
    with pytest.raises(ValueError):
        feature_matching_rewards(t([[1.0, 0.0]] * 3), t([[1.0, 0.0]]), 2, alignment_coef=1, diversity_coef=1,
                                 whiten=False)


def test_estimators_by_hand():
    r = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert group_advantages(r, 3, "rloo").tolist() == pytest.approx([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    assert group_advantages(r, 3, "group_norm").tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert group_advantages(r, 3, "grpo").tolist() == group_advantages(r, 3, "group_norm").tolist()
    assert group_advantages(r, 3, "reinforce").tolist() == r.tolist()
    with pytest.raises(ValueError):
        group_advantages(r, 3, "ppo")


def test_adaptive_max_tokens():
    assert adaptive_max_tokens([10, 100], 1.5, 256) == 150  # the longest ground truth × 1.5
    assert adaptive_max_tokens([10], 1.5, 256) == 64  # at least 64 tokens
    assert adaptive_max_tokens([10], 1.5, 32) == 32  # never above max_completion_length (Axolotl's floor can be)
    assert adaptive_max_tokens([1000], 1.5, 256) == 256


def test_multiturn_transforms():
    from reinforge.data.formats.strategies import ebft_chat_multiturn as mt

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
            {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]
    first = mt.transform()[0]({"messages": msgs})
    assert first == {"prompt": msgs[:2], "ground_truth": "B", "remaining_turns": msgs[3:]}
    assert mt.transform_last_turn()[0]({"conversations": msgs}) == {"prompt": msgs[:4], "ground_truth": "D"}
    fn, kwargs = mt.transform_all_turns()
    assert kwargs["batched"] is True
    assert fn({"messages": [msgs]}) == {"prompt": [msgs[:2], msgs[:4]], "ground_truth": ["B", "D"]}
    with pytest.raises(ValueError, match="no assistant turn"):
        mt.transform_last_turn()[0]({"messages": msgs[:2]})


def _expected_gradient(theta, phi, gt, n, estimator):
    """E over every n-tuple of tokens of the REINFORCE gradient of `strided_policy_loss` with eq. 7's rewards and
    `estimator`'s advantages, for a one-token policy softmax(theta) over K tokens with features phi [K, D]: the
    exact expectation (a sum over K^n tuples weighted by their probability), not a sample mean."""
    import itertools

    from reinforge.algorithms.ebft_strided import strided_policy_loss

    grad = torch.zeros_like(theta)
    for tup in itertools.product(range(len(phi)), repeat=n):
        th = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(th, -1)[list(tup)]
        out = feature_matching_rewards(phi[list(tup)], gt, n, alignment_coef=1.0, diversity_coef=1.0, whiten=False)
        loss = strided_policy_loss(logp.view(n, 1), group_advantages(out.rewards, n, estimator))
        (g,) = torch.autograd.grad(loss, th)
        grad += torch.exp(torch.log_softmax(theta, -1)[list(tup)].sum()) * g
    return grad


@pytest.mark.parametrize("n", [2, 3])
def test_reinforce_on_eq7_rewards_descends_the_cfm_loss_exactly(n):
    """The paper's claim behind eq. 7: REINFORCE on r_j is an unbiased estimate of −∇ of the CFM loss
    ‖E[φ(ŷ)] − φ(y)‖² (eq. 2), so EBFT's loss descends it in expectation. Checked exactly (every tuple of a
    3-token policy), with autograd's ∇cfm of μ = Σ_v p_v φ_v. With the RLOO baseline the other samples' rewards
    depend on sample j through their diversity term, so the expectation is ∇cfm − ∇‖μ‖²/(n−1): a pull towards less
    diversity (documented in docs/ebft.md); group_norm rescales it."""
    torch.manual_seed(0)
    phi = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    gt = torch.nn.functional.normalize(torch.randn(1, 4, dtype=torch.float64), dim=-1)
    theta = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)

    th = theta.clone().requires_grad_(True)
    mu = torch.softmax(th, -1) @ phi
    (cfm_grad,) = torch.autograd.grad(((mu - gt[0]) ** 2).sum(), th)
    th = theta.clone().requires_grad_(True)
    (mu2_grad,) = torch.autograd.grad((torch.softmax(th, -1) @ phi).pow(2).sum(), th)

    assert cfm_grad.abs().max() > 0.05  # a real slope to follow
    assert _expected_gradient(theta, phi, gt, n, "reinforce") == pytest.approx(cfm_grad, abs=1e-12)
    assert _expected_gradient(theta, phi, gt, n, "rloo") == pytest.approx(cfm_grad - mu2_grad / (n - 1), abs=1e-12)
