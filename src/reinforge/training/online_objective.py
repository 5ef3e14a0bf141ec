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
from reinforge.algorithms.importance_sampling import sampler_importance_weights, sampler_metrics
from reinforge.algorithms.policy_gradient import masked_mean
from reinforge.algorithms.policy_losses import policy_loss_metrics, policy_loss_terms
from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig
from reinforge.rollout.prepare import RolloutBatch, per_token


class PolicyGradientObjective:
    """GRPO/GDPO's policy loss of `trl.loss_type` (grpo, bnpo, dr_grpo, dapo, luspo: the clipped surrogate; cispo,
    sapo, vespo), + k3 KL when beta > 0, × sampler importance weights when the rollout carries them, with the
    optional off-policy sequence mask; aggregated per `trl.loss_type` (`algorithms.policy_losses`).

    EBFT structured mode adds `ebft.ce_coef` × the cross-entropy of the micro-batch's reference rows (prompt +
    ground truth, `RolloutBatch.ce_first`): their summed NLL over `ce_norm` (the rollout's reference tokens per
    micro-batch) / gradient_accumulation_steps, so a step's term is the token mean over its ground truths, as
    strided mode's `ce_coef`; the policy loss is weighted by `ebft.rl_coef`. Logged as `ebft/ce_loss` (nats per
    ground-truth token) and `ebft/rl_loss`.

    Args: the config values it needs, as plain numbers and names.
    """

    stats = ("entropy",)

    def __init__(self, *, epsilon_low: float, epsilon_high: float, beta: float, importance_sampling_level: str,
                 loss_type: str, max_completion_length: int, gradient_accumulation_steps: int,
                 off_policy_mask_threshold: float | None = None, bias_correction_kl: bool = False,
                 kernels: dict[str, float] | None = None, rl_coef: float = 1.0, ce_coef: float = 0.0):
        self.epsilon_low, self.epsilon_high, self.beta = epsilon_low, epsilon_high, beta
        self.level, self.loss_type = importance_sampling_level, loss_type
        self.max_completion_length, self.ga = max_completion_length, gradient_accumulation_steps
        self.off_policy_mask_threshold, self.bias_correction_kl = off_policy_mask_threshold, bias_correction_kl
        self.kernels = kernels or {}
        self.rl_coef, self.ce_coef = rl_coef, ce_coef

    @classmethod
    def from_config(cls, cfg: ReinforgeConfig) -> "PolicyGradientObjective":
        t = cfg.trl
        return cls(epsilon_low=t.epsilon, epsilon_high=t.epsilon_high if t.epsilon_high is not None else t.epsilon,
                   beta=t.beta or 0.0, importance_sampling_level=t.importance_sampling_level, loss_type=t.loss_type,
                   max_completion_length=t.max_completion_length, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                   off_policy_mask_threshold=t.off_policy_mask_threshold, bias_correction_kl=t.use_bias_correction_kl,
                   kernels={k: getattr(t, k) for k in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                                                       "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")},
                   rl_coef=cfg.ebft.rl_coef, ce_coef=cfg.ebft.ce_coef)  # the ebft: section exists only with rl: ebft

    def __call__(self, out: dict[str, torch.Tensor], mb: RolloutBatch, num_items_in_batch: float
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_tokens, N, T = mb.batch["n_tokens"], mb.size, mb.mask.shape[1]
        logps_all = per_token(out, n_tokens)  # completion rows, then any reference rows
        logps, entropy = logps_all[:N, :T], per_token(out, n_tokens, "token_entropy")[:N, :T]
        weights, sampling = mb.sampler_weights, {}
        if mb.correction is not None:  # on-policy rollout: π_old is this forward's own log-probs (RolloutPreparer)
            c, old = mb.correction, logps.detach()
            corr = sampler_importance_weights(old, mb.sampler_logps, mb.mask, mode=c.mode, cap_max=c.cap_max,
                                              cap_min=c.cap_min)
            weights, sampling = corr.weights, sampler_metrics(corr, old, mb.sampler_logps, mb.mask)
        terms = policy_loss_terms(logps, mb.advantages, mb.mask, epsilon_low=self.epsilon_low,
                                  epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                                  old_per_token_logps=mb.old_logps, importance_sampling_level=self.level,
                                  beta=self.beta, ref_per_token_logps=mb.ref_logps, sampler_weights=weights,
                                  sampler_logps=mb.sampler_logps, off_policy_mask_threshold=self.off_policy_mask_threshold,
                                  bias_correction_kl=self.bias_correction_kl, **self.kernels)
        loss = aggregate_loss(terms.per_token_loss, mb.mask, self.loss_type, max_completion_length=self.max_completion_length,
                              num_items_in_batch=num_items_in_batch, gradient_accumulation_steps=self.ga)
        ce_metrics = {}
        if self.rl_coef != 1.0 or self.ce_coef:
            ce_metrics["ebft/rl_loss"] = loss.detach() * self.ga
            loss = self.rl_coef * loss
        if self.ce_coef and mb.ce_first:  # padding of per_token is 0: the sum is over ground-truth tokens only
            nll = -logps_all[N:].sum()
            loss = loss + self.ce_coef * nll / (max(mb.ce_norm, 1.0) * self.ga)
            ce_metrics["ebft/ce_loss"] = nll.detach() / n_tokens[N:].sum().clamp(min=1)
        metrics = {"loss": loss.detach() * self.ga, "entropy": masked_mean(entropy, mb.mask), **sampling, **ce_metrics,
                   **policy_loss_metrics(self.loss_type, terms.ratio, mb.advantages, mb.mask,
                                         epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, phi=terms.phi)}
        if terms.per_token_kl is not None:
            metrics["kl"] = masked_mean(terms.per_token_kl, mb.mask)
        if terms.keep is not None:
            metrics["off_policy_masked_ratio"] = 1.0 - terms.keep.mean()
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
