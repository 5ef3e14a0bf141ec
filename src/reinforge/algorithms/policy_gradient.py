"""GRPO's per-token policy loss: clipped importance-weighted surrogate plus a k3 KL penalty.

Shapes: B completions, T completion positions (right-padded). `mask` [B, T] is 1 on the tokens that
count in the loss (completion tokens; 0 on padding and on masked completions). Log-probabilities
are per token, [B, T], of the sampled completion tokens under: the current policy
(`per_token_logps`, with gradient), the policy that generated the rollout (`old_per_token_logps`,
no gradient) and the reference model (`ref_per_token_logps`, no gradient).

The loss types built on these pieces, and the whole per-token loss (KL, sampler correction, off-policy
mask), are in `reinforge.algorithms.policy_losses`; `reinforge.algorithms.aggregation` averages it.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceSamplingLevel = Literal["token", "sequence"]


def log_importance_weights(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log of the importance ratio π_θ / π_θold.

    "token": log r_{i,t} = log π_θ(o_t) − log π_old(o_t), shape [B, T] (GRPO, arXiv 2402.03300 eq. 3).
    "sequence": GSPO's length-normalised sequence ratio s_i = (π_θ(o_i)/π_old(o_i))^(1/|o_i|)
    (arXiv 2507.18071, §4):
        log s_i = (1/|o_i|) Σ_t mask·(log π_θ − log π_old), shape [B, 1] (|o_i| clamped to ≥ 1).

    Args:
        per_token_logps, old_per_token_logps, mask: [B, T].
        level: "token" or "sequence".
    Returns:
        [B, T] or [B, 1].
    Raises:
        ValueError: unknown level.
    """
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence'; got {level!r}")


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate k3 = exp(Δ) − Δ − 1 with Δ = log π_ref − log π_θ.

    Unbiased, non-negative estimator from J. Schulman, "Approximating KL Divergence" (2020 blog
    post, k3); the form used in GRPO (arXiv 2402.03300 eq. 4).

    Args: [B, T] each. Returns: [B, T] (≥ 0), differentiable in `per_token_logps`.
    """
    delta = ref_per_token_logps - per_token_logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                           epsilon_high: float) -> torch.Tensor:
    """Negative clipped surrogate −min(r·Â, clip(r, 1 − ε_low, 1 + ε_high)·Â) with r = exp(log_ratio).

    PPO's objective as used by GRPO (arXiv 2402.03300 eq. 3); separate lower/upper ranges are DAPO's
    "Clip-Higher" (arXiv 2503.14476 §3.1). With a [B, 1] sequence ratio this is GSPO's
    clipped sequence objective (arXiv 2507.18071 §4).

    Args:
        log_ratio: [B, T] (token level) or [B, 1] (sequence level).
        advantages: [B], [B, 1] or [B, T].
        epsilon_low, epsilon_high: clipping ranges ≥ 0.
    Returns:
        Per-token loss, shape of `log_ratio` broadcast with `advantages` ([B, 1] advantages and a
        [B, 1] ratio give [B, 1]).
    """
    advantages = _as_column(advantages)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the tokens where `mask` is 1 (0-d tensor).

    Args:
        values: [B, T], or [B, 1] for per-sequence values (then the plain mean over B, as TRL's
            metrics do for sequence-level ratios).
        mask: [B, T].
    Returns: 0-d tensor; the denominator is clamped to ≥ 1 (an all-masked batch gives 0).
    """
    if values.shape[-1] == 1 and mask.shape[-1] != 1:
        return values.sum() / max(values.shape[0], 1)
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def _masked_seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if values.shape[-1] == 1 and mask.shape[-1] != 1:
        return values.squeeze(-1)
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1)  # NaN for an all-masked row: skipped by the nan-min/max


def clip_ratio_metrics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                       epsilon_high: float) -> dict[str, torch.Tensor]:
    """Fraction of tokens whose ratio is clipped in the direction that zeroes the gradient
    (TRL 1.16's metric names and definitions).

    A token is low-clipped when r < 1 − ε_low and Â < 0, high-clipped when r > 1 + ε_high and
    Â > 0; region = either.

    Args:
        ratio: [B, T] or [B, 1] importance ratio (`PolicyLossTerms.ratio`).
        advantages: [B], [B, 1] or [B, T].
        mask: [B, T].
        epsilon_low, epsilon_high: the clipping ranges used in the loss.
    Returns:
        0-d detached tensors: "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"
        (masked token means; per-sequence means for a [B, 1] ratio), "clip_ratio/low_min" (smallest
        per-sequence low-clip fraction) and "clip_ratio/high_max" (largest per-sequence high-clip
        fraction); sequences with no unmasked token are skipped (NaN if all are).
    """
    ratio = ratio.detach()
    advantages = _as_column(advantages.detach())
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(ratio.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(ratio.dtype)
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": masked_mean(low, mask),
        "clip_ratio/low_min": _nan_reduce(_masked_seq_mean(low, mask), torch.min),
        "clip_ratio/high_mean": masked_mean(high, mask),
        "clip_ratio/high_max": _nan_reduce(_masked_seq_mean(high, mask), torch.max),
        "clip_ratio/region_mean": masked_mean(region, mask),
    }


def _as_column(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def _nan_reduce(x: torch.Tensor, op) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return op(x)
