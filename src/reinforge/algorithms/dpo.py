"""DPO loss family (Rafailov et al. 2023, arXiv 2305.18290) as pure functions of log-prob tensors.

All inputs are per-pair summed log-probabilities of the completion tokens, shape [B]:
`policy_chosen`, `policy_rejected`, `ref_chosen`, `ref_rejected`. Each loss returns per-pair losses
[B]; the caller averages. Rewards (implicit) are β·(policy − reference) log-prob of each completion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log πc − log π_ref,c) − (log πr − log π_ref,r), shape [B] (the DPO log-ratio margin)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                 ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                 beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO sigmoid loss, arXiv 2305.18290 eq. 7; with label_smoothing ε, conservative DPO (cDPO,
    Mitchell 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).

    Args: [B] summed log-probs each; beta > 0; 0 <= label_smoothing < 0.5.
    Returns: [B] per-pair losses.
    """
    h = dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward β·(log π − log π_ref), shape as inputs. Detached (a metric, not a loss)."""
    return (beta * (policy_logps - ref_logps)).detach()
