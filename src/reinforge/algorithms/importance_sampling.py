"""Importance-sampling correction for the sampler/trainer mismatch (vLLM sampling, trainer scoring).

The completions of a rollout are sampled by an inference engine (vLLM) whose log-probs differ from the
trainer's own for the same weights (other kernels, precision, a stale weight version). The policy-gradient
estimate is an expectation under the trainer's old policy π_old, but the samples come from the sampler μ, so
each token's surrogate term is re-weighted by ρ = π_old / μ, truncated or masked for variance
("truncated importance sampling", Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training", fengyao.notion.site/off-policy-rl; the sequence variants follow TRL 1.16's
`vllm_importance_sampling_mode`). Shapes: B completions × T completion positions, right-padded; `mask`
[B, T] is 1 on the tokens in the loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class SamplerCorrection(NamedTuple):
    """Output of `sampler_importance_weights`.

    weights: [B, T] (token modes) or [B, 1] (sequence modes), no gradient; multiply the per-token
        policy-gradient term by it.
    log_diff: [B, T] log π_old − log μ on the masked tokens (0 elsewhere and where μ is unknown).
    """

    weights: torch.Tensor
    log_diff: torch.Tensor


def sampler_importance_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, *,
                               mode: str, cap_max: float | None, cap_min: float | None = None) -> SamplerCorrection:
    """Importance weights ρ = π_old / μ of sampled tokens, truncated or masked.

    Token modes: ρ_{i,t} = exp(log π_old(o_t) − log μ(o_t)). Sequence modes: one ρ_i = exp(Σ_t mask·(log π_old −
    log μ)) per completion (the sequence likelihood ratio, not length-normalised, as TRL 1.16).
    `*_truncate`: ρ clamped to [cap_min, cap_max] (a None bound is open). `*_mask`: ρ set to 0 outside
    [cap_min, cap_max] and kept as is inside (Axolotl's token mask leaves masked tokens at 1/cap; here a
    masked token contributes nothing, as TRL 1.16).

    Args:
        old_logps: [B, T] trainer log-probs of the sampled tokens under the weights that sampled them (no grad).
        sampler_logps: [B, T] the sampler's log-probs of the same tokens; NaN where the sampler gave none
            (treated as no correction: difference 0, as TRL 1.16).
        mask: [B, T] 1 on loss tokens.
        mode: one of IS_MODES.
        cap_max: upper bound C_max (> 0) or None; cap_min: lower bound C_min (≥ 0) or None.
    Returns:
        SamplerCorrection(weights [B, T] or [B, 1], log_diff [B, T]).
    Raises:
        ValueError: unknown mode, or cap_min > cap_max.
    """
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode must be one of {', '.join(IS_MODES)}; got {mode!r}")
    if cap_min is not None and cap_max is not None and cap_min > cap_max:
        raise ValueError(f"cap_min ({cap_min}) > cap_max ({cap_max})")
    m = mask.to(old_logps.dtype)
    log_diff = torch.nan_to_num((old_logps.detach() - sampler_logps) * m, nan=0.0)
    log_ratio = log_diff.sum(-1, keepdim=True) if mode.startswith("sequence") else log_diff
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        weights = ratio if cap_min is None and cap_max is None else torch.clamp(ratio, min=cap_min, max=cap_max)
    else:
        low = -math.inf if cap_min is None else cap_min
        high = math.inf if cap_max is None else cap_max
        weights = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return SamplerCorrection(weights, log_diff)


def sampler_metrics(correction: SamplerCorrection, old_logps: torch.Tensor, sampler_logps: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL 1.16's sampling metrics of one rollout: `sampling/sampling_logp_difference/mean|max` (|log π_old −
    log μ| over loss tokens with a known μ) and `sampling/importance_sampling_ratio/min|mean|max` (over loss
    tokens, or over completions for sequence weights). Empty selections give 0, as TRL. 0-d tensors."""
    keep = mask.bool()
    delta = (old_logps.detach() - sampler_logps).abs()
    delta = delta[keep & ~torch.isnan(delta)]
    w = correction.weights
    flat = w.flatten() if w.shape[-1] == 1 and mask.shape[-1] != 1 else w[keep]
    zero = old_logps.new_zeros(())

    def reduce(x, op):
        return op(x) if x.numel() else zero

    return {
        "sampling/sampling_logp_difference/mean": reduce(delta, torch.mean),
        "sampling/sampling_logp_difference/max": reduce(delta, torch.max),
        "sampling/importance_sampling_ratio/min": reduce(flat, torch.min),
        "sampling/importance_sampling_ratio/mean": reduce(flat, torch.mean),
        "sampling/importance_sampling_ratio/max": reduce(flat, torch.max),
    }


def off_policy_sequence_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor, sampling_logps: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556, "Off-Policy Sequence Masking"): a completion
    is dropped when its advantage is negative and its mean per-token gap to the policy that sampled it exceeds
    `threshold`:

        δ_i = Σ_t m·(log μ(o_t) − log π_θ(o_t)) / max(Σ_t m, 1),   M_i = 1 if Â_i ≥ 0 or δ_i ≤ threshold else 0.

    Negative-advantage samples that the current policy already finds unlikely are the ones whose gradient
    pushes hardest on an off-policy estimate; positive ones are always kept. As TRL 1.16
    (`GRPOTrainer.get_off_policy_mask`), μ is the sampler's log-probs when known (else the old policy's),
    tokens with an unknown μ (NaN) count as a zero gap, and π_θ is taken without gradient.

    Args:
        advantages: [B] or [B, 1].
        per_token_logps: [B, T] current-policy log-probs (detached here).
        sampling_logps: [B, T] log-probs under the sampling policy.
        mask: [B, T] 1 on loss tokens.
        threshold: δ above which a negative-advantage sequence is dropped (nats per token, ≥ 0).
    Returns:
        [B, 1] of 1.0 (keep) / 0.0 (drop), in `mask`'s floating dtype (float32 for an integer mask).
    """
    m = mask.to(per_token_logps.dtype)
    gap = torch.nan_to_num(sampling_logps - per_token_logps.detach(), nan=0.0)
    mean_gap = (gap * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    dtype = mask.dtype if mask.dtype.is_floating_point else torch.float32
    return ((adv >= 0) | (mean_gap <= threshold)).to(dtype)
