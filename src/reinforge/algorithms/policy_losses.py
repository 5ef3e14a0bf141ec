"""The per-token policy losses of TRL 1.16's GRPO `loss_type`s, as pure functions of tensors.

Shapes and inputs as in `reinforge.algorithms.policy_gradient`: B completions × T completion positions
(right-padded), `mask` [B, T] 1 on the loss tokens, per-token log-probs [B, T] of the sampled tokens under
the current policy (`per_token_logps`, with gradient) and the policy that generated the rollout
(`old_per_token_logps`, no gradient); advantages [B] (or [B, 1]).

| loss_type                        | per-token loss                                        | aggregation  |
| -------------------------------- | ----------------------------------------------------- | ------------ |
| grpo, bnpo, dr_grpo, dapo, luspo | −min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)               | by loss_type |
| cispo                            | −sg(min(r, ε_high))·Â·log π_θ                         | as dapo      |
| sapo                             | −σ(τ(r − 1))·(4/τ)·Â, τ = τ_pos if Â > 0 else τ_neg   | as grpo      |
| vespo                            | −sg(φ(w))·Â·log π_θ, w the sequence IS weight         | as dapo      |

r is the importance ratio π_θ/π_old at `importance_sampling_level` ("token": [B, T]; "sequence": GSPO's
length-normalised [B, 1] ratio). `policy_per_token_loss` dispatches over all eight types; the KL penalty
β·k3 is added by the caller afterwards (`policy_gradient.k3_kl`), as TRL does.

TRL 1.16 only *warns* (it trains anyway) when: luspo runs at the "token" level (LUSPO is defined on
GSPO's sequence ratio); vespo runs at the "sequence" level (VESPO builds its own unnormalised sequence
weight from the token log-ratios; the level changes nothing but the returned `ratio`); bnpo, dr_grpo,
dapo or cispo run at the "sequence" level (token sums weight each sequence by its length). It *refuses*
vespo with the vLLM importance-sampling correction in a sequence mode (`vllm_importance_sampling_mode`
must be token_truncate or token_mask): VESPO needs the per-token sampler ratio. These functions do not
warn; the only check kept is the last one (`vespo_gamma_weights` rejects a sampler ratio that is not
[B, T]).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from reinforge.algorithms.aggregation import LOSS_TYPES
from reinforge.algorithms.importance_sampling import off_policy_sequence_mask
from reinforge.algorithms.policy_gradient import (
    clip_ratio_metrics,
    clipped_surrogate_loss,
    k3_kl,
    log_importance_weights,
    masked_mean,
)

CLIPPED_SURROGATE_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")

_LOG_W_MIN = math.log(1e-8)  # VESPO's lower bound on log w (TRL and the authors' code)
_LOG_W_MAX = 20.0


def cispo_per_token_loss(per_token_logps: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor,
                         epsilon_high: float) -> torch.Tensor:
    """CISPO per-token loss −sg(min(r, ε_high))·Â·log π_θ: a REINFORCE term weighted by the truncated,
    stop-gradient importance ratio, so no token's gradient is dropped (only its weight is capped).

    MiniMax-M1, arXiv 2506.13585 eq. 4 (objective) with eq. 5's clipped weight
    r̂ = clip(r, 1 − ε_low^IS, 1 + ε_high^IS); aggregate with loss_type "cispo" (eq. 4's 1/Σ|o_i|).

    Args:
        per_token_logps: [B, T] current-policy log-probs (with gradient).
        ratio: importance ratio r = π_θ/π_old, [B, T] (token) or [B, 1] (sequence); only its value is
            used (detached here).
        advantages: [B] or [B, 1] (or [B, T]).
        epsilon_high: the cap ε_max on r, an absolute ratio (not 1 + ε): TRL's `epsilon_high`, whose
            default is `epsilon` (0.2, which would cap every ratio at 0.2); ScaleRL (arXiv 2510.13786)
            recommends 5.0.
    Returns:
        [B, T] per-token loss; gradient −min(r, ε_high)·Â w.r.t. `per_token_logps`.

    Deviations from the paper (as TRL 1.16): only the upper truncation, with ε_high the cap itself, i.e.
    ScaleRL's form of CISPO; MiniMax-M1 also leaves the lower bound open in practice (large ε_low^IS).
    """
    weight = torch.clamp(ratio.detach(), max=epsilon_high)
    return -weight * _column(advantages) * per_token_logps


def sapo_per_token_loss(ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float,
                        temperature_neg: float) -> torch.Tensor:
    """SAPO per-token loss −f(r)·Â with the soft gate f(r) = σ(τ(r − 1))·4/τ replacing the hard clip.

    Soft Adaptive Policy Optimization, arXiv 2511.20347 (the SAPO objective and its gate f_{i,t}):
    τ = τ_pos where Â > 0 and τ_neg otherwise (the paper takes τ_neg > τ_pos, damping negative updates
    faster). f(1) = 2/τ and df/dr(1) = 1, so on-policy the gradient is the plain policy gradient −Â·∇log π;
    far from r = 1 the gradient decays smoothly instead of being cut. Aggregate with loss_type "sapo"
    (the paper's per-sequence token mean, as grpo).

    Args:
        ratio: r = π_θ/π_old with gradient, [B, T] (token, as in the paper) or [B, 1] (sequence).
        advantages: [B] or [B, 1] (or [B, T]).
        temperature_pos, temperature_neg: τ_pos, τ_neg > 0 (TRL defaults 1.0 and 1.05).
    Returns:
        Per-token loss, the broadcast shape of `ratio` and the advantages.

    Deviation from TRL 1.16: τ is held in the dtype of `ratio`; TRL builds it in the default dtype
    (float32), so τ = 1.05 differs from TRL's by ~5e-8 in a float64 run.
    """
    advantages = _column(advantages)
    tau = torch.where(advantages > 0, ratio.new_tensor(temperature_pos), ratio.new_tensor(temperature_neg))
    return -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * advantages


def vespo_gamma_weights(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, k_pos: float,
                        lambda_pos: float, k_neg: float, lambda_neg: float,
                        sampler_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """VESPO's gamma reshaping weight φ(w) = w^k·e^{λ(1 − w)} of the sequence importance weight w (detached).

    VESPO, arXiv 2602.10693 (the closed-form reshaping kernel on sequence-level weights, normalised so
    φ(1) = 1): w is the full sequence likelihood ratio, not length-normalised,
        log w_i = Σ_t mask·clamp(log π_θ − log π_old, ±20) [+ Σ_t mask·log ρ_{i,t}],
    clamped to [log 1e-8, 20], where ρ = π_old/μ is the optional token-level sampler (vLLM) ratio, so that
    w = π_θ/μ. (k, λ) = (k_pos, λ_pos) where Â ≥ 0, else (k_neg, λ_neg); λ is clamped to ≥ 1e-4 and a
    non-finite φ becomes 0, as TRL 1.16 and the authors' code do. k sets how fast φ falls for w < 1,
    λ how fast for w > 1 (φ peaks at w = k/λ). A token whose sampler weight is 0 (a `*_mask` mode
    rejecting it) pushes log w to its lower bound, so φ ≈ 0 for the whole sequence.

    Args:
        log_ratio: [B, T] token log-ratios log π_θ − log π_old (any gradient is ignored).
        advantages: [B] or [B, 1] (a [B, T] tensor gives a [B, T] result).
        mask: [B, T] loss mask.
        k_pos, lambda_pos, k_neg, lambda_neg: kernel parameters (TRL defaults 2.0, 3.0, 3.0, 2.0).
        sampler_ratio: [B, T] token-level sampler weights ρ (truncated or masked), no gradient; None: none.
    Returns:
        φ, [B, 1], no gradient.
    Raises:
        ValueError: `sampler_ratio` not shaped like `log_ratio` (a sequence-level [B, 1] sampler ratio;
            TRL 1.16 refuses vespo with a sequence `vllm_importance_sampling_mode` too).

    Deviation from TRL 1.16: the sampler log-ratio is summed over the masked tokens only (as the authors'
    code); TRL sums it over all T positions. Identical whenever ρ = 1 off the mask, which TRL's and
    `importance_sampling.sampler_importance_weights`' ratios are unless 1 lies outside their caps.
    """
    log_ratio = log_ratio.detach()
    m = mask.to(log_ratio.dtype)
    seq_log_w = (torch.clamp(log_ratio, -_LOG_W_MAX, _LOG_W_MAX) * m).sum(-1, keepdim=True)
    if sampler_ratio is not None:
        if sampler_ratio.shape != log_ratio.shape:
            raise ValueError(
                f"vespo needs a token-level sampler ratio shaped like the log-ratios {tuple(log_ratio.shape)}; got "
                f"{tuple(sampler_ratio.shape)} (use a token_* importance sampling mode)"
            )
        log_rho = torch.log(sampler_ratio.detach().to(log_ratio.dtype).clamp(min=1e-8)).clamp(max=_LOG_W_MAX)
        seq_log_w = seq_log_w + (log_rho * m).sum(-1, keepdim=True)
    log_w = torch.clamp(seq_log_w, _LOG_W_MIN, _LOG_W_MAX)
    nonneg = _column(advantages.detach()) >= 0
    k = torch.where(nonneg, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
    lam = torch.where(nonneg, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg)).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def vespo_per_token_loss(per_token_logps: torch.Tensor, phi: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """VESPO per-token loss −sg(φ(w))·Â·log π_θ (arXiv 2602.10693): the REINFORCE form whose gradient is
    φ(w)·Â·∇log π_θ, with φ from `vespo_gamma_weights`. Aggregate with loss_type "vespo" (token sum over
    the window's loss tokens, as dapo; TRL 1.16's choice).

    Args:
        per_token_logps: [B, T] current-policy log-probs (with gradient).
        phi: [B, 1] gamma weights (detached here).
        advantages: [B] or [B, 1] (or [B, T]).
    Returns:
        [B, T] per-token loss.
    """
    return -phi.detach() * _column(advantages) * per_token_logps


class PolicyLossOutput(NamedTuple):
    """Output of `policy_per_token_loss`.

    per_token_loss: [B, T], or [B, 1] for the clipped surrogate / sapo at the sequence level without
        a token-level sampler ratio; includes the sampler correction, excludes the KL term.
    ratio: π_θ/π_old at `importance_sampling_level`, [B, T] or [B, 1], detached (for metrics).
    phi: VESPO's [B, 1] gamma weights (detached) for loss_type "vespo", else None.
    """

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    phi: torch.Tensor | None


def policy_per_token_loss(loss_type: str, per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
                          advantages: torch.Tensor, mask: torch.Tensor, *, epsilon_low: float, epsilon_high: float,
                          importance_sampling_level: str, sapo_temperature_pos: float, sapo_temperature_neg: float,
                          vespo_k_pos: float, vespo_lambda_pos: float, vespo_k_neg: float, vespo_lambda_neg: float,
                          sampler_ratio: torch.Tensor | None = None) -> PolicyLossOutput:
    """The per-token policy loss of any of the eight loss types (module table), before the KL term and
    the aggregation, in TRL 1.16's order.

    Sampler (vLLM) importance ratio contract: `sampler_ratio` ρ = π_old/μ is applied here, once, for every
    loss type. For all but "vespo" it multiplies the per-token loss (as in TRL); for "vespo" it enters the
    sequence weight w inside φ instead and does not multiply the loss. Either way the caller must not
    multiply the returned loss by ρ again; add β·k3 (unweighted) afterwards, then `aggregate_loss`.

    Args:
        loss_type: one of `aggregation.LOSS_TYPES`.
        per_token_logps: [B, T] current-policy log-probs (with gradient).
        old_per_token_logps: [B, T] log-probs of the policy that sampled the rollout; None when it is the
            current one (r = 1 in value; `per_token_logps.detach()` is used, as TRL does).
        advantages: [B] (or [B, 1]) advantages, no gradient.
        mask: [B, T] loss mask.
        epsilon_low, epsilon_high: clip ranges of the clipped surrogate; for "cispo" `epsilon_high` is the
            absolute ratio cap (see `cispo_per_token_loss`). Resolve TRL's `epsilon_high = epsilon`
            default before calling.
        importance_sampling_level: "token" or "sequence" (`policy_gradient.log_importance_weights`).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's τ_pos, τ_neg (used by "sapo" only).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's kernel (used by "vespo" only).
        sampler_ratio: sampler importance weights, no gradient: [B, T] (token modes) or [B, 1]
            (sequence modes; not allowed for "vespo"); None: no correction.
    Returns:
        PolicyLossOutput(per_token_loss, ratio, phi).
    Raises:
        ValueError: unknown loss_type or level, or a [B, 1] sampler ratio with "vespo".
    """
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    log_w = log_importance_weights(per_token_logps, old_per_token_logps, mask, importance_sampling_level)
    ratio = torch.exp(log_w)
    phi = None
    if loss_type in CLIPPED_SURROGATE_LOSS_TYPES:
        per_token_loss = clipped_surrogate_loss(log_w, advantages, epsilon_low, epsilon_high)
    elif loss_type == "cispo":
        per_token_loss = cispo_per_token_loss(per_token_logps, ratio, advantages, epsilon_high)
    elif loss_type == "sapo":
        per_token_loss = sapo_per_token_loss(ratio, advantages, sapo_temperature_pos, sapo_temperature_neg)
    elif loss_type == "vespo":
        phi = vespo_gamma_weights(per_token_logps - old_per_token_logps, advantages, mask, k_pos=vespo_k_pos,
                                  lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg,
                                  sampler_ratio=sampler_ratio)
        per_token_loss = vespo_per_token_loss(per_token_logps, phi, advantages)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if sampler_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * sampler_ratio.detach()
    return PolicyLossOutput(per_token_loss, ratio.detach(), phi)


class PolicyLossTerms(NamedTuple):
    """Output of `policy_loss_terms`.

    per_token_loss: [B, T] (or [B, 1] for a sequence-level loss without KL); mask and aggregate it with
        `aggregation.aggregate_loss`.
    ratio: π_θ/π_old, [B, T] or [B, 1], detached (for metrics).
    per_token_kl: [B, T] KL term (detached; × r under bias correction), or None when beta == 0.
    phi: VESPO's [B, 1] weights or None. keep: [B, 1] off-policy mask or None (off).
    """

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    per_token_kl: torch.Tensor | None
    phi: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def policy_loss_terms(per_token_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                      epsilon_low: float, epsilon_high: float, loss_type: str = "grpo",
                      old_per_token_logps: torch.Tensor | None = None, importance_sampling_level: str = "token",
                      beta: float = 0.0, ref_per_token_logps: torch.Tensor | None = None,
                      sampler_weights: torch.Tensor | None = None, sampler_logps: torch.Tensor | None = None,
                      off_policy_mask_threshold: float | None = None, bias_correction_kl: bool = False,
                      sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                      vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                      vespo_lambda_neg: float = 2.0) -> PolicyLossTerms:
    """The whole per-token GRPO-family loss, in TRL 1.16's order (`GRPOTrainer._compute_loss`):

        L_{i,t} = M_i · ρ_{i,t} · ℓ_{i,t} + β · KL3_{i,t} · (r_{i,t} if bias_correction_kl else 1)

    (with bias correction r keeps its gradient, as in TRL).

    ℓ the policy term of `loss_type` (`policy_per_token_loss`: GRPO's clipped surrogate, arXiv 2402.03300 eq. 3,
    or cispo/sapo/vespo), ρ the sampler importance weights (`importance_sampling.sampler_importance_weights`;
    for vespo inside φ instead), M_i the off-policy sequence mask (`importance_sampling.off_policy_sequence_mask`),
    KL3 the k3 estimate of KL(π_θ‖π_ref) (`policy_gradient.k3_kl`) and r = π_θ/π_old.

    Args:
        per_token_logps: [B, T] current-policy log-probs (with gradient).
        advantages: [B] (or [B, 1]); mask: [B, T] loss mask.
        epsilon_low, epsilon_high: clip ranges (resolve `epsilon_high = epsilon` before calling).
        loss_type: one of `aggregation.LOSS_TYPES`.
        old_per_token_logps: [B, T] or None (the rollout is optimised by the weights that scored it: r = 1).
        importance_sampling_level: "token" or "sequence" (GSPO).
        beta: KL coefficient (0: no KL, no reference needed); ref_per_token_logps: [B, T], required when beta > 0.
        sampler_weights: [B, T] / [B, 1] sampler importance weights, or None.
        sampler_logps: [B, T] the sampler's log-probs (for the off-policy mask; default the old policy's).
        off_policy_mask_threshold: δ of the off-policy mask, None: off.
        bias_correction_kl: multiply the KL term by r (TRL's `use_bias_correction_kl`).
        sapo_temperature_pos/neg, vespo_*: the kernels of sapo and vespo (TRL 1.16's defaults).
    Returns:
        PolicyLossTerms.
    Raises:
        ValueError: beta > 0 without reference log-probs, an unknown loss type or level.
    """
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta > 0 needs ref_per_token_logps (reference-model log-probs)")
    out = policy_per_token_loss(loss_type, per_token_logps, old_per_token_logps, advantages, mask,
                                epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                importance_sampling_level=importance_sampling_level,
                                sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                                vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                                vespo_lambda_neg=vespo_lambda_neg, sampler_ratio=sampler_weights)
    per_token_loss, keep = out.per_token_loss, None
    if off_policy_mask_threshold is not None:
        sampling = sampler_logps if sampler_logps is not None else (
            old_per_token_logps if old_per_token_logps is not None else per_token_logps.detach())
        keep = off_policy_sequence_mask(advantages, per_token_logps, sampling, mask, off_policy_mask_threshold)
        per_token_loss = per_token_loss * keep.to(per_token_loss.dtype)
    kl = None
    if beta != 0.0:
        kl = k3_kl(per_token_logps, ref_per_token_logps)
        if bias_correction_kl:  # r with its gradient, as TRL 1.16
            old = old_per_token_logps if old_per_token_logps is not None else per_token_logps.detach()
            kl = kl * torch.exp(log_importance_weights(per_token_logps, old, mask, importance_sampling_level))
        per_token_loss = per_token_loss + beta * kl
        kl = kl.detach()
    return PolicyLossTerms(per_token_loss, out.ratio, kl, out.phi, keep)


def policy_loss_metrics(loss_type: str, ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                        epsilon_low: float, epsilon_high: float,
                        phi: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss-specific metrics TRL 1.16 logs for `loss_type`, under TRL's names (0-d detached tensors).

    - grpo, bnpo, dr_grpo, dapo, luspo: `policy_gradient.clip_ratio_metrics` ("clip_ratio/...").
    - cispo: "cispo_clip_ratio", the fraction of loss tokens (of sequences, for a [B, 1] ratio) whose
      weight is capped while it matters for the update direction: r > ε_high and Â > 0.
    - sapo: none.
    - vespo: "vespo/phi_seq_mean", the mean of φ over the B sequences.

    Args:
        loss_type: one of `aggregation.LOSS_TYPES`.
        ratio: `PolicyLossOutput.ratio`, [B, T] or [B, 1].
        advantages: [B] or [B, 1] (or [B, T]).
        mask: [B, T] loss mask.
        epsilon_low, epsilon_high: the values given to `policy_per_token_loss`.
        phi: `PolicyLossOutput.phi`; required for "vespo".
    Returns:
        dict of metric name → 0-d tensor (empty for "sapo").
    Raises:
        ValueError: unknown loss_type, or "vespo" without `phi`.
    """
    if loss_type in CLIPPED_SURROGATE_LOSS_TYPES:
        return clip_ratio_metrics(ratio, advantages, mask, epsilon_low, epsilon_high)
    if loss_type == "cispo":
        capped = (ratio.detach() > epsilon_high) & (_column(advantages.detach()) > 0)
        return {"cispo_clip_ratio": masked_mean(capped.to(ratio.dtype), mask)}
    if loss_type == "sapo":
        return {}
    if loss_type == "vespo":
        if phi is None:
            raise ValueError("loss_type 'vespo' metrics need phi (PolicyLossOutput.phi)")
        return {"vespo/phi_seq_mean": masked_mean(phi.detach(), mask)}
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _column(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
