"""Energy-based fine-tuning (EBFT): feature-matching rewards and advantages, as pure functions of tensors.

"Matching Features, Not Tokens: Energy-Based Fine-Tuning of Language Models" (Jelassi et al., 2026,
arXiv 2603.12248). A frozen feature network φ (the policy with its adapter disabled, or a frozen copy) embeds n
generated completions ŷ_1..ŷ_n of a prompt and its ground truth y; the generator is trained by REINFORCE on

    r_j = α · 2 φ(ŷ_j)ᵀφ(y) − β · 2/(n−1) Σ_{j'≠j} φ(ŷ_j)ᵀφ(ŷ_j')                     (paper eq. 7)

an unbiased estimate of the gradient of the conditional feature-matching loss
‖E_ŷ[φ(ŷ)] − φ(y)‖² (eq. 2, `cfm_loss`). Features are L2-normalised (so the first term is 2·cos), or, with
whitening, multiplied by the group's whitening matrix (then the first term is 2·cos of the whitened features and
the second uses the whitened, unnormalised ones). Shapes: P groups (prompts or strided anchors) × n samples,
prompt-major; D the feature size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def feature_layer_indices(fractions: list[float], num_hidden_layers: int) -> list[int]:
    """Indices into a model's hidden states (0 = the embeddings, L = the last layer) of the depths `fractions`:
    int(f × L) each. Raises ValueError for a fraction outside [0, 1]."""
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"feature layer fractions must be in [0, 1]; got {fractions}")
    return [int(f * num_hidden_layers) for f in fractions]


def pool_features(hidden: torch.Tensor, mask: torch.Tensor, method: str,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token features → one vector per sequence.

    Args:
        hidden: [B, S, D] features (right-padded); mask: [B, S] 1 on real tokens.
        method: "last_token" (the last real token), "mean_pooling" (mean over real tokens), "completion_mean"
            (mean over the real tokens at positions ≥ start), "concat" (the tokens at ⌊len/4⌋, ⌊len/2⌋, ⌊3·len/4⌋
            concatenated: [B, 3D]).
        start: [B] first completion position (completion_mean).
    Returns:
        [B, D] ([B, 3D] for concat).
    Raises:
        ValueError: unknown method, or completion_mean without `start`.
    """
    B, S, _ = hidden.shape
    m = mask.to(hidden.dtype)
    lengths = mask.long().sum(1)
    rows = torch.arange(B, device=hidden.device)
    if method == "last_token":
        return hidden[rows, (lengths - 1).clamp(min=0)]
    if method == "mean_pooling":
        return (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    if method == "completion_mean":
        if start is None:
            raise ValueError("completion_mean needs the completion start of each sequence")
        keep = m * (torch.arange(S, device=hidden.device).unsqueeze(0) >= start.unsqueeze(1)).to(hidden.dtype)
        return (hidden * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
    if method == "concat":
        picks = [(lengths * k // 4).clamp(max=S - 1) for k in (1, 2, 3)]
        return torch.cat([hidden[rows, p] for p in picks], dim=-1)
    raise ValueError(f"unknown embed_method {method!r}; valid: last_token, mean_pooling, completion_mean, concat")


def whitening_matrix(features: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """The whitening matrix W = U diag(1/s) Uᵀ of a group's features (SVD of featuresᵀ = U diag(s) Vᵀ); singular
    values ≤ tol × the largest are dropped (pseudo-inverse), as the paper's reference code.

    Args: features [n, D] (float32/64); tol: relative cut-off. Returns: [D, D].
    """
    U, s, _ = torch.linalg.svd(features.T, full_matrices=False)
    inv = torch.where(s > tol * s.max(), 1.0 / s, torch.zeros_like(s))
    return (U * inv.unsqueeze(0)) @ U.T


class FeatureRewards(NamedTuple):
    """Output of `feature_matching_rewards` (all detached).

    rewards: [P·n] r_j (eq. 7); alignment: [P·n] 2·cos(g_j, gt) before its coefficient; diversity: [P·n]
    2/(n−1)·Σ_{j'≠j} g_j·g_j' before its coefficient; cfm_loss: [P] ‖mean_j g_j − gt‖² of the transformed features.
    """

    rewards: torch.Tensor
    alignment: torch.Tensor
    diversity: torch.Tensor
    cfm_loss: torch.Tensor


@torch.no_grad()
def feature_matching_rewards(generated: torch.Tensor, ground_truth: torch.Tensor, num_samples: int, *,
                             alignment_coef: float, diversity_coef: float, whiten: bool,
                             tol: float = 1e-5) -> FeatureRewards:
    """EBFT's rewards of n samples per group against the group's ground truth (paper eq. 7).

    Args:
        generated: [P·n, D] pooled features of the samples, group-major.
        ground_truth: [P, D] pooled features of each group's ground truth.
        num_samples: n ≥ 2.
        alignment_coef, diversity_coef: α, β.
        whiten: per-group whitening (`whitening_matrix` of the group's samples, applied to samples and ground
            truth) instead of L2 normalisation.
    Returns:
        FeatureRewards.
    Raises:
        ValueError: n < 2 or shapes that do not match.
    """
    n = num_samples
    if n < 2:
        raise ValueError(f"feature-matching rewards need >= 2 samples per group; got {n}")
    P = ground_truth.shape[0]
    if generated.shape[0] != P * n or generated.shape[1] != ground_truth.shape[1]:
        raise ValueError(f"generated {tuple(generated.shape)} does not match {P} groups × {n} samples of "
                         f"ground truth {tuple(ground_truth.shape)}")
    g = generated.double().view(P, n, -1)
    gt = ground_truth.double().unsqueeze(1)  # [P, 1, D]
    if whiten:
        W = torch.stack([whitening_matrix(g[p], tol) for p in range(P)])  # [P, D, D]
        g, gt = g @ W, gt @ W
    else:
        g, gt = F.normalize(g, dim=-1), F.normalize(gt, dim=-1)
    alignment = 2.0 * F.cosine_similarity(g, gt.expand_as(g), dim=-1)  # [P, n]
    sims = g @ g.transpose(1, 2)  # [P, n, n]
    off = sims.sum(-1) - torch.diagonal(sims, dim1=1, dim2=2)
    diversity = 2.0 * off / (n - 1)
    rewards = alignment_coef * alignment - diversity_coef * diversity
    cfm = ((g.mean(1) - gt.squeeze(1)) ** 2).sum(-1)
    dtype = generated.dtype
    return FeatureRewards(rewards.flatten().to(dtype), alignment.flatten().to(dtype), diversity.flatten().to(dtype),
                          cfm.to(dtype))


def group_advantages(rewards: torch.Tensor, num_samples: int, estimator: str) -> torch.Tensor:
    """Advantages of n samples per group.

    - "rloo": A_j = r_j − 1/(n−1) Σ_{j'≠j} r_j' (leave-one-out baseline; Ahmadian et al. 2024, arXiv 2402.14740);
    - "group_norm" (alias "grpo"): A_j = (r_j − mean) / (std + 1e-9), unbiased std (GRPO, arXiv 2402.03300 §4.1.2);
    - "reinforce": A_j = r_j (no baseline).

    With eq. 7's rewards, REINFORCE ("reinforce") is an unbiased estimate of ∇ of the CFM loss. The RLOO baseline is
    not independent of sample j here (the other samples' rewards hold −2/(n−1)·φ(ŷ_j')·φ(ŷ_j)), so in expectation the
    "rloo" gradient of the loss is ∇cfm − ∇‖E φ(ŷ)‖²/(n−1): a pull towards less diversity, which the paper's
    diversity term has to outweigh (tests/unit/test_ebft.py checks both by exact enumeration).

    Args: rewards [P·n] group-major; num_samples n ≥ 2; estimator. Returns: [P·n].
    Raises: ValueError for an unknown estimator.
    """
    r = rewards.view(-1, num_samples)
    if estimator == "rloo":
        return (r - (r.sum(-1, keepdim=True) - r) / (num_samples - 1)).flatten()
    if estimator in ("group_norm", "grpo"):
        return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)).flatten()
    if estimator == "reinforce":
        return r.flatten().clone()
    raise ValueError(f"unknown advantage_estimator {estimator!r}; valid: rloo, group_norm, grpo, reinforce")
