"""Objectives: the bridge from config to the pure loss functions in `reinforge.algorithms`.

An objective takes the policy's log-prob outputs, the reference log-probs (when the method uses a
reference) and the batch, calls a pure loss with explicit float arguments, and returns the scalar
loss and the metrics under TRL's names. Reading from config to loss: `build_objective` → one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reinforge.algorithms import dpo
from reinforge.config.schema import ReinforgeConfig

Metrics = dict[str, torch.Tensor]


@dataclass
class DPOObjective:
    """DPO with the sigmoid loss (arXiv 2305.18290), β = `rl_beta`."""

    beta: float
    label_smoothing: float = 0.0
    needs_reference: bool = True

    def __call__(self, policy: dict[str, torch.Tensor], ref_logps: torch.Tensor | None,
                 batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        B = batch["n_pairs"]
        logps = policy["logps"]
        pc, pr = logps[:B], logps[B:]
        rc, rr = ref_logps[:B].to(logps.dtype), ref_logps[B:].to(logps.dtype)
        losses = dpo.sigmoid_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
        chosen_r = dpo.implicit_rewards(pc, rc, self.beta)
        rejected_r = dpo.implicit_rewards(pr, rr, self.beta)
        metrics = {
            "rewards/chosen": chosen_r.mean(),
            "rewards/rejected": rejected_r.mean(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            "rewards/margins": (chosen_r - rejected_r).mean(),
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }
        return losses.mean(), metrics


def build_objective(cfg: ReinforgeConfig):
    """The objective for `cfg.rl`. Raises ValueError for a method without an offline objective."""
    if cfg.rl in ("dpo", "ipo"):
        return DPOObjective(beta=cfg.beta)
    raise ValueError(f"rl: {cfg.rl} has no offline objective yet")
