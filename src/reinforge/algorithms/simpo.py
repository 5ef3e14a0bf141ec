"""SimPO (Meng et al. 2024, arXiv 2405.14734) and CPO (Xu et al. 2024, arXiv 2401.08417): no reference model.

SimPO's reward is the length-normalised log-prob, β·(1/|y|)·log π(y|x); CPO's is the summed log-prob
β·log π(y|x). Both add (CPO) or may add (SimPO with `cpo_alpha` > 0, "CPO-SimPO") the chosen
completions' NLL, `reinforge.algorithms.dpo.chosen_nll`, weighted by α.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO, arXiv 2405.14734 eq. 6: −log σ(β·(log P̄_w − log P̄_l) − γ), P̄ the mean per-token
    probability. With label_smoothing ε: −(1−ε)·log σ(z) − ε·log σ(−z), z the same argument (TRL).

    Args: chosen_logps, rejected_logps [B]: mean per-token log-probs; beta > 0; gamma: target reward
        margin γ (TRL's `simpo_gamma`, default 0.5); 0 <= label_smoothing < 0.5.
    Returns: [B] per-pair losses.
    """
    z = beta * (chosen_logps - rejected_logps) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO preference term, arXiv 2401.08417 eq. 3 (DPO with π_ref dropped): −log σ(β·(log π_w − log π_l)),
    summed log-probs; with label_smoothing ε as in `simpo_loss`.

    Args: chosen_logps, rejected_logps [B]: summed log-probs; beta > 0; 0 <= label_smoothing < 0.5.
    Returns: [B] per-pair losses. The full CPO loss adds α·`chosen_nll` (α = 1 in the paper).
    """
    z = beta * (chosen_logps - rejected_logps)
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
