"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) as pure functions of log-prob tensors.

KTO trains on unpaired completions, each labelled desirable (True) or undesirable (False). The value
of a completion is measured against a reference point z₀ = KL(π‖π_ref), estimated per batch from
mismatched (prompt, completion) pairs: the completion of one example scored after the prompt of
another (see `reinforge.data.collate.UnpairedCollator`), as in the paper and TRL 1.16's KTOTrainer.
"""

from __future__ import annotations

import torch


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀ (arXiv 2402.01306 §4.1): mean over the batch of
    log π(y'|x) − log π_ref(y'|x) on mismatched pairs, clamped at 0, detached (no gradient flows
    through z₀, as in the paper and TRL).

    Args: policy_kl_logps, ref_kl_logps [B]: summed log-probs of the mismatched completions.
    Returns: scalar >= 0. Averaging across processes, if any, is the caller's (before the clamp).
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | float,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example KTO losses, arXiv 2402.01306 eq. 7 (loss = λ_y − v(x, y), written as λ_y·(1 − σ(·))):

        desirable:   λ_D · (1 − σ(β·(r − z₀)))
        undesirable: λ_U · (1 − σ(β·(z₀ − r)))      with r = log π(y|x) − log π_ref(y|x).

    The batch loss is the mean over all examples (TRL 1.16: mean of the concatenated weighted losses).

    Args:
        policy_logps, ref_logps [B]: summed completion log-probs; labels [B] bool (True = desirable).
        kl: z₀, scalar (from `kl_estimate`; 0 gives the no-reference-point variant).
        beta > 0; desirable_weight λ_D > 0, undesirable_weight λ_U > 0.
    Returns: [B] weighted per-example losses, in the input order.
    """
    labels = labels.to(torch.bool)
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(labels, desirable, undesirable)


def weighting_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                     undesirable_weight: float) -> str | None:
    """Check KTO's class-weighting rule (arXiv 2402.01306 eq. 8): λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3].

    Returns None when the rule holds (or the counts are equal, as TRL 1.16 does not warn then), else a
    message giving the ranges for `kto_desirable_weight` (λ_U fixed) or `kto_undesirable_weight`
    (λ_D fixed) that satisfy it. Counts of 0 are treated as 1, as in TRL.
    """
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    if n_d == n_u:
        return None
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    d_lo, d_hi = undesirable_weight * n_u / n_d, undesirable_weight * n_u / n_d * 4 / 3
    u_lo, u_hi = desirable_weight * n_d / n_u * 3 / 4, desirable_weight * n_d / n_u
    return (f"KTO: {n_d} desirable vs {n_u} undesirable examples with kto_desirable_weight={desirable_weight}, "
            f"kto_undesirable_weight={undesirable_weight} gives λ_D·n_D/(λ_U·n_U) = {ratio:.3f}, outside the paper's "
            f"[1, 4/3] (arXiv 2402.01306 eq. 8). Set EITHER kto_desirable_weight in [{d_lo:.3g}, {d_hi:.3g}] "
            f"OR kto_undesirable_weight in [{u_lo:.3g}, {u_hi:.3g}].")
