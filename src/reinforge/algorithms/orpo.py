"""ORPO (Hong et al. 2024, arXiv 2403.07691) as pure functions: no reference model.

Inputs are length-normalised log-probabilities: the mean log-prob per completion token,
log P(y|x) = (1/|y|)·Σ_t log p(y_t | x, y_<t), shape [B] for chosen and rejected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate over the whole range (Mächler 2012: switch at −log 2).

    Args: x [...] <= 0. Returns: same shape (−inf at x = 0).
    """
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log OR(y_w, y_l) = log odds(y_w|x) − log odds(y_l|x), odds(y|x) = P/(1 − P) (arXiv 2403.07691 eq. 4, 5):
    (log P_w − log P_l) − (log(1 − P_w) − log(1 − P_l)).

    Args: chosen_logps, rejected_logps [B]: mean per-token log-probs (< 0). Returns: [B].
    """
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, nll: torch.Tensor,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_ORPO = L_SFT + λ·L_OR with L_OR = −mean_B log σ(log OR) (arXiv 2403.07691 eq. 6, 7).

    Args:
        chosen_logps, rejected_logps [B]: mean per-token log-probs.
        nll: scalar L_SFT, the chosen completions' NLL per token (`reinforge.algorithms.dpo.chosen_nll`
            on summed log-probs). Deviation: TRL 1.16's ORPOTrainer also counts the prompt tokens of the
            chosen sequence in this NLL; the paper's L_SFT is over the response, as here.
        alpha: λ >= 0 (TRL's `beta`, Axolotl's `orpo_alpha`).
    Returns: (scalar loss, log_odds [B], log σ(log_odds) [B]); the last two carry gradients.
    """
    log_odds = log_odds_ratio(chosen_logps, rejected_logps)
    ratio = F.logsigmoid(log_odds)
    return nll - alpha * ratio.mean(), log_odds, ratio
