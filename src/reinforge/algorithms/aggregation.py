"""How per-token policy losses become one scalar: the GRPO-family loss aggregations.

All averaging over tokens and sequences lives in `aggregate_loss`. The `loss_type`s differ only in the
normaliser (TRL 1.16 `GRPOTrainer._compute_loss` semantics); the per-token losses themselves come from
`reinforge.algorithms.policy_losses.policy_per_token_loss`:

| loss_type          | loss of one micro-batch                        | source (arXiv)                          |
| ------------------ | ---------------------------------------------- | --------------------------------------- |
| grpo, sapo         | mean_i [ Σ_t m·l / Σ_t m ]  / GA               | GRPO 2402.03300 eq. 3; SAPO 2511.20347  |
| bnpo               | Σ_{i,t} m·l / Σ_{i,t} m     / GA               | token mean of the micro-batch           |
| dr_grpo            | Σ_{i,t} m·l / (B · max_completion_length) / GA | Dr. GRPO 2503.20783 §3.2                |
| dapo, cispo, vespo | Σ_{i,t} m·l / num_items_in_batch               | DAPO 2503.14476 eq. 8; CISPO 2506.13585 eq. 4 |
| luspo              | mean_i [ Σ_t m·l ]          / GA               | LUSPO 2602.05261                        |

GA = gradient_accumulation_steps: the loss of each micro-batch is scaled so that summing the
gradients of GA micro-batches gives the gradient of the step's objective. For "dapo" (and "cispo",
"vespo") the normaliser `num_items_in_batch` is the number of loss tokens of the *whole* accumulation
window, so every token of the optimiser step has the same weight (DAPO's token-level loss), and no
further division by GA happens. "luspo" sums each sequence's loss over its tokens: with a [B, 1]
sequence-level loss that is |o_i|·l_i, LUSPO's length-scaled GSPO objective.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
                   max_completion_length: int | None = None, num_items_in_batch: float | torch.Tensor | None = None,
                   gradient_accumulation_steps: int = 1) -> torch.Tensor:
    """Reduce a per-token loss to the scalar loss of one micro-batch.

    Args:
        per_token_loss: [B, T] (or [B, 1], broadcast over T: a sequence-level loss counted once per
            unmasked token, as TRL does).
        mask: [B, T] 1 for tokens in the loss, 0 for padding / masked completions.
        loss_type: one of LOSS_TYPES (see the module table).
        max_completion_length: the generation limit L (tokens); required by "dr_grpo", whose
            normaliser is the constant B·L (Dr. GRPO removes the per-response length 1/|o_i|).
        num_items_in_batch: required by "dapo", "cispo" and "vespo": the number of unmasked loss
            tokens in the whole optimiser step (all micro-batches of the accumulation window; with
            several processes, the per-process average, because gradients are averaged across
            processes). Clamped to ≥ 1. TRL 1.16 computes it as (loss tokens of the generation batch over all
            processes) / num_processes × gradient_accumulation_steps / steps_per_generation; pass
            that value to reproduce TRL exactly.
        gradient_accumulation_steps: GA ≥ 1 for training; pass 1 for evaluation (no accumulation).
    Returns:
        0-d loss tensor (gradient flows to `per_token_loss`).
    Raises:
        ValueError: unknown loss_type, or a missing/invalid argument that the loss_type needs.

    Deviations: "grpo" (and "sapo") sequences with no unmasked token count as 0 (their length is
    clamped to 1) but still count in the mean over B, as in TRL 1.16. Dr. GRPO's paper sums over the group
    and divides by a constant; B·L is TRL's choice of constant.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1; got {gradient_accumulation_steps}")
    m = mask.to(per_token_loss.dtype)
    masked = per_token_loss * m  # broadcasts a [B, 1] loss over T
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        return loss / gradient_accumulation_steps
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1.0) / gradient_accumulation_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1; got {max_completion_length!r}")
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length) / gradient_accumulation_steps
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(
                f"loss_type {loss_type!r} needs num_items_in_batch: the number of loss tokens in the optimiser step "
                "(all micro-batches of the gradient-accumulation window)"
            )
        norm = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
        return masked.sum() / norm.clamp(min=1.0)
    if loss_type == "luspo":
        return masked.sum(-1).mean() / gradient_accumulation_steps
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
