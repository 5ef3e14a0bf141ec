"""Online objectives: the loss of one rollout micro-batch, chosen by the method table (`MethodSpec.objective`).

An online objective is built once from the config (floats read here, passed to the pure functions of
`reinforge.algorithms`) and called per micro-batch as `objective(out, mb, num_items_in_batch) -> (loss, metrics)`:
`out` is the policy forward (`LogpsModel` output with `token_logps` and `token_entropy`), `mb` a
`RolloutBatch` micro-batch. Metrics are detached scalars with TRL's names.
"""

from __future__ import annotations

from typing import Callable

import torch

from reinforge.algorithms.aggregation import aggregate_loss
from reinforge.algorithms.policy_gradient import clip_ratio_metrics, grpo_per_token_loss, masked_mean
from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig
from reinforge.rollout.prepare import RolloutBatch, per_token


class PolicyGradientObjective:
    """GRPO/GDPO's clipped policy-gradient loss (+ k3 KL when beta > 0, × sampler importance weights when the
    rollout carries them), aggregated per `trl.loss_type`.

    Args: the config values it needs, as plain numbers and names.
    """

    stats = ("entropy",)

    def __init__(self, *, epsilon_low: float, epsilon_high: float, beta: float, importance_sampling_level: str,
                 loss_type: str, max_completion_length: int, gradient_accumulation_steps: int):
        self.epsilon_low, self.epsilon_high, self.beta = epsilon_low, epsilon_high, beta
        self.level, self.loss_type = importance_sampling_level, loss_type
        self.max_completion_length, self.ga = max_completion_length, gradient_accumulation_steps

    @classmethod
    def from_config(cls, cfg: ReinforgeConfig) -> "PolicyGradientObjective":
        t = cfg.trl
        return cls(epsilon_low=t.epsilon, epsilon_high=t.epsilon_high if t.epsilon_high is not None else t.epsilon,
                   beta=t.beta or 0.0, importance_sampling_level=t.importance_sampling_level, loss_type=t.loss_type,
                   max_completion_length=t.max_completion_length, gradient_accumulation_steps=cfg.gradient_accumulation_steps)

    def __call__(self, out: dict[str, torch.Tensor], mb: RolloutBatch, num_items_in_batch: float
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_tokens = mb.batch["n_tokens"]
        logps, entropy = per_token(out, n_tokens), per_token(out, n_tokens, "token_entropy")
        terms = grpo_per_token_loss(logps, mb.advantages, mb.mask, epsilon_low=self.epsilon_low,
                                    epsilon_high=self.epsilon_high, old_per_token_logps=mb.old_logps,
                                    importance_sampling_level=self.level, beta=self.beta,
                                    ref_per_token_logps=mb.ref_logps, sampler_weights=mb.sampler_weights)
        loss = aggregate_loss(terms.per_token_loss, mb.mask, self.loss_type, max_completion_length=self.max_completion_length,
                              num_items_in_batch=num_items_in_batch, gradient_accumulation_steps=self.ga)
        metrics = {"loss": loss.detach() * self.ga, "entropy": masked_mean(entropy, mb.mask),
                   **clip_ratio_metrics(terms.ratio, mb.advantages, mb.mask, self.epsilon_low, self.epsilon_high)}
        if terms.per_token_kl is not None:
            metrics["kl"] = masked_mean(terms.per_token_kl, mb.mask)
        return loss, metrics


ONLINE_OBJECTIVES: dict[str, Callable[[ReinforgeConfig], object]] = {
    "policy_gradient": PolicyGradientObjective.from_config,
}


def build_online_objective(cfg: ReinforgeConfig):
    """The online objective of `cfg.rl` (from the method table). Raises ValueError for a method without one."""
    spec = method(cfg.rl)
    if spec.objective not in ONLINE_OBJECTIVES:
        raise ValueError(f"rl: {cfg.rl} has no online objective")
    return ONLINE_OBJECTIVES[spec.objective](cfg)
