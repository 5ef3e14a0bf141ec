"""Objectives: the bridge from config to the pure loss functions in `reinforge.algorithms`.

An objective is called as `objective(policy_out, ref, batch) -> (loss, metrics)`:
- `policy_out`: the dict of `reinforge.models.forward.LogpsModel.forward` — `logps` [S] per-sequence sums,
  `token_logps` [N], `token_seq` [N] (and, for WPO, `token_log_sum_sq_probs` [N]);
- `ref`: the reference's `logps` [S] (detached), or its whole output dict, or None when
  `objective.needs_reference` is False. LD-DPO needs the dict (`objective.needs_reference_tokens`);
- `batch`: the collated batch; `n_tokens` [S] gives scored tokens per sequence, `n_pairs` = B for
  paired batches (sequences [chosen_0..B-1, rejected_0..B-1]), `labels` [B] for KTO batches
  (sequences [completion_0..B-1, KL_0..B-1], see `reinforge.data.collate.UnpairedCollator`).
The loss is a scalar; metrics are detached scalars named as TRL 1.16 names them (a metric that is
undefined for a batch, e.g. KTO's rewards/chosen without desirable examples, is NaN and skipped by
the accumulator). Config values are read once, in `build_objective`, and passed to the pure
functions as floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reinforge.algorithms import dpo, kto, orpo, simpo
from reinforge.config.schema import ReinforgeConfig

Metrics = dict[str, torch.Tensor]
NAN = float("nan")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar over processes (no-op in a single process). Detached."""
    value = value.detach()
    if _dist_ready():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


def _ref_sums(ref: torch.Tensor | dict[str, torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor:
    if ref is None:
        raise ValueError("this objective needs reference log-probs, got None")
    sums = ref["logps"] if isinstance(ref, dict) else ref
    return sums.detach().to(dtype)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values[mask], NaN when the mask is empty (an undefined metric for this batch)."""
    if not bool(mask.any()):
        return values.new_tensor(NAN)
    return values[mask].mean()


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                  rejected_logps: torch.Tensor) -> Metrics:
    """TRL's paired metrics: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}."""
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _token_stat_metrics(policy: dict[str, torch.Tensor], n_pairs: int) -> Metrics:
    """TRL 1.16 DPOTrainer's token metrics from the policy forward's `token_*` statistics (those present), means
    over completion tokens: `entropy` (chosen and rejected), `logits/chosen`, `logits/rejected` (mean logit over
    the vocabulary), `mean_token_accuracy` (chosen: arg-max = next token). Sequences < n_pairs are chosen."""
    out: Metrics = {}
    if not any(k in policy for k in ("token_entropy", "token_mean_logits", "token_is_top1")):
        return out
    chosen = policy["token_seq"] < n_pairs
    if "token_entropy" in policy:
        out["entropy"] = policy["token_entropy"].mean() if policy["token_entropy"].numel() else policy["logps"].new_tensor(NAN)
    if "token_mean_logits" in policy:
        out["logits/chosen"] = _masked_mean(policy["token_mean_logits"], chosen)
        out["logits/rejected"] = _masked_mean(policy["token_mean_logits"], ~chosen)
    if "token_is_top1" in policy:
        out["mean_token_accuracy"] = _masked_mean(policy["token_is_top1"], chosen)
    return out


class RunningMean:
    """Cumulative mean of every value passed to `update` (over all processes when distributed).

    State of the bco_pair loss: its reward shift δ is the mean of all implicit rewards (chosen and
    rejected) seen in training so far, updated with the current batch before δ is used (TRL < 1.0's
    RunningMoments behaviour). Saved in checkpoints through the objective's `state_dict`.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @property
    def mean(self) -> float:
        """The current mean (0.0 before the first update)."""
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])

    def update(self, values: torch.Tensor) -> None:
        """Add `values` [...] (detached) to the mean."""
        stats = torch.stack([values.detach().double().sum(), values.new_tensor(values.numel(), dtype=torch.float64)])
        if _dist_ready():
            torch.distributed.all_reduce(stats)
        self.total += float(stats[0])
        self.count += int(stats[1])


@dataclass
class DPOObjective:
    """The DPO loss family (arXiv 2305.18290 and variants, see `reinforge.algorithms.dpo`).

    loss = Σ_k w_k · mean_B(loss_k) (`dpo.preference_loss`), + rpo_alpha · chosen NLL (RPO). With
    `use_weighting` (WPO) every per-pair loss is multiplied by w_c·w_r; with `ld_alpha` (LD-DPO) the
    policy and reference log-probs are LD-weighted before every loss except `sft`, as in TRL 1.16.
    bco_pair with `bco_running_mean` keeps a `RunningMean` of the rewards, updated only when gradients
    are enabled (training steps, not evaluation); the δ it gives is logged as `bco_running_mean`.
    """

    beta: float
    label_smoothing: float = 0.0
    needs_reference: bool = True
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    rpo_alpha: float | None = None
    use_weighting: bool = False
    ld_alpha: float | None = None
    discopop_tau: float = 0.05
    bco_running_mean: bool = True
    bco_state: RunningMean = field(default_factory=RunningMean)
    # token statistics the policy forward should return, for TRL's `entropy`, `logits/*`, `mean_token_accuracy`
    token_stats: tuple[str, ...] = ("entropy", "mean_logits", "is_top1")

    def state_dict(self) -> dict[str, Any]:
        """Running state to checkpoint (the bco_pair reward mean)."""
        return {"bco": self.bco_state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bco_state.load_state_dict(state["bco"])

    def __post_init__(self) -> None:
        types = [dpo.canonical_loss_type(t) for t in self.loss_types]
        weights = [float(w) for w in self.loss_weights]
        if len(types) != len(weights):
            raise ValueError(f"{len(types)} loss types but {len(weights)} weights")
        if self.rpo_alpha:
            # RPO adds α × the chosen NLL per token: TRL 1.16's `sft` term with weight α.
            if "sft" in types:
                weights[types.index("sft")] += self.rpo_alpha
            else:
                types.append("sft")
                weights.append(self.rpo_alpha)
        self._types, self._weights = tuple(types), tuple(weights)

    @property
    def needs_reference_tokens(self) -> bool:
        """True when `ref` must be the reference's whole output dict (per-token log-probs), for LD-DPO."""
        return self.ld_alpha is not None

    def __call__(self, policy: dict[str, torch.Tensor], ref: torch.Tensor | dict[str, torch.Tensor] | None,
                 batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        B = batch["n_pairs"]
        raw = policy["logps"]
        n_tokens = batch["n_tokens"].to(raw.device)
        lengths = n_tokens.to(raw.dtype)
        if self.ld_alpha is None:
            logps, ref_logps = raw, _ref_sums(ref, raw.dtype)
        else:
            if not isinstance(ref, dict) or "token_logps" not in ref:
                raise ValueError("ld_alpha (LD-DPO) needs the reference's per-token log-probs: pass the reference "
                                 "forward's output dict as `ref` (objective.needs_reference_tokens is True)")
            logps = dpo.ld_logps(policy["token_logps"], policy["token_seq"], n_tokens, self.ld_alpha)
            ref_logps = dpo.ld_logps(ref["token_logps"].detach().to(raw.dtype), ref["token_seq"], n_tokens,
                                     self.ld_alpha)
        pc, pr = logps[:B], logps[B:]
        rc, rr = ref_logps[:B], ref_logps[B:]

        pair_weights = None
        if self.use_weighting:
            if "token_log_sum_sq_probs" not in policy:
                raise ValueError("dpo_use_weighting (WPO) needs `token_log_sum_sq_probs` (log Σ_v p_v² per scored "
                                 "token) from the policy forward")
            w = dpo.wpo_weights(policy["token_logps"], policy["token_log_sum_sq_probs"], policy["token_seq"], n_tokens)
            pair_weights = w[:B] * w[B:]

        delta = 0.0
        if "bco_pair" in self._types and self.bco_running_mean:
            if torch.is_grad_enabled():
                self.bco_state.update(torch.cat([self.beta * (pc - rc), self.beta * (pr - rr)]))
            delta = self.bco_state.mean

        loss, parts = dpo.preference_loss(
            self._types, self._weights, pc, pr, rc, rr, lengths[:B], lengths[B:], self.beta,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau, bco_delta=delta,
            pair_weights=pair_weights, sft_chosen=raw[:B])
        metrics = _pair_metrics(self.beta * (pc - rc), self.beta * (pr - rr), pc, pr)
        metrics.update(_token_stat_metrics(policy, B))
        if "bco_pair" in self._types and self.bco_running_mean:
            metrics["bco_running_mean"] = raw.new_tensor(delta).detach()  # δ of this micro-batch (all processes)
        if "sft" in parts:
            metrics["nll_loss"] = dpo.chosen_nll(raw[:B].detach(), lengths[:B])
        return loss, metrics


@dataclass
class KTOObjective:
    """KTO (arXiv 2402.01306 eq. 7), β = `rl_beta`, λ_D/λ_U = `kto_desirable_weight`/`kto_undesirable_weight`.

    The batch holds B examples then their B mismatched KL sequences (`UnpairedCollator`; with several
    processes the mismatch rotates over the global micro-batch); z₀ is the clamped mean policy-minus-reference
    log-ratio of the KL sequences, averaged over processes before the clamp (TRL 1.16), without gradient; every
    process holds the same number of rows, so that average is the mean over the global micro-batch.
    loss = mean over the B examples of the weighted losses.
    Metrics (TRL 1.16 KTOTrainer): kl, rewards/chosen, logps/chosen (over desirable examples),
    rewards/rejected, logps/rejected (undesirable), rewards/margins (when both are present).
    """

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    needs_reference: bool = True
    needs_reference_tokens: bool = False

    def __call__(self, policy: dict[str, torch.Tensor], ref: torch.Tensor | dict[str, torch.Tensor] | None,
                 batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        labels = batch["labels"].to(torch.bool)
        B = labels.numel()
        logps = policy["logps"]
        if logps.shape[0] != 2 * B:
            raise ValueError(f"KTO expects {2 * B} sequences (B={B} examples, then their mismatched KL sequences; "
                             f"see UnpairedCollator), got {logps.shape[0]}")
        labels = labels.to(logps.device)
        ref_logps = _ref_sums(ref, logps.dtype)
        pol, rf = logps[:B], ref_logps[:B]
        z0 = _mean_across_processes((logps[B:].detach() - ref_logps[B:]).mean()).clamp(min=0)
        losses = kto.kto_losses(pol, rf, labels, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = (self.beta * (pol - rf)).detach()
        metrics = {
            "kl": z0,
            "rewards/chosen": _masked_mean(rewards, labels),
            "logps/chosen": _masked_mean(pol.detach(), labels),
            "rewards/rejected": _masked_mean(rewards, ~labels),
            "logps/rejected": _masked_mean(pol.detach(), ~labels),
            "rewards/margins": _masked_mean(rewards, labels) - _masked_mean(rewards, ~labels),
        }
        return losses.mean(), metrics

    def weighting_advice(self, rows: list[dict[str, Any]]) -> str | None:
        """The class-balance warning for a training set (`kto.weighting_advice`), or None when it holds.

        Args: rows: tokenised training rows, each with a bool `label`.
        """
        n_d = sum(1 for r in rows if r["label"])
        return kto.weighting_advice(n_d, len(rows) - n_d, self.desirable_weight, self.undesirable_weight)


def _mean_logps(policy: dict[str, torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed logps [S], mean per-token logps [S]) of a paired batch."""
    sums = policy["logps"]
    lengths = batch["n_tokens"].to(sums.device).to(sums.dtype)
    return sums, sums / lengths.clamp(min=1)


@dataclass
class ORPOObjective:
    """ORPO (arXiv 2403.07691): chosen NLL per token + λ·(−mean log σ(log odds ratio)), λ = `orpo_alpha`.

    Log-probs are mean per completion token. No reference. Metrics (TRL 1.16 ORPOTrainer):
    rewards/* = λ·mean log-prob, logps/* (mean per token), nll_loss, log_odds_ratio (mean log σ(log OR)),
    log_odds_chosen (mean log OR). Deviation: TRL also counts the chosen prompt tokens in the NLL.
    """

    alpha: float
    needs_reference: bool = False
    needs_reference_tokens: bool = False

    def __call__(self, policy: dict[str, torch.Tensor], ref: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        B = batch["n_pairs"]
        sums, avg = _mean_logps(policy, batch)
        lengths = batch["n_tokens"].to(sums.device).to(sums.dtype)
        nll = dpo.chosen_nll(sums[:B], lengths[:B])
        loss, log_odds, ratio = orpo.orpo_loss(avg[:B], avg[B:], nll, self.alpha)
        metrics = _pair_metrics(self.alpha * avg[:B], self.alpha * avg[B:], avg[:B], avg[B:])
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                        "log_odds_chosen": log_odds.detach().mean()})
        return loss, metrics


@dataclass
class SimPOObjective:
    """SimPO (arXiv 2405.14734) + `cpo_alpha` × chosen NLL (CPO, arXiv 2401.08417; 0 = SimPO proper).

    Log-probs are mean per completion token; no reference. Metrics (TRL 1.16 CPOTrainer): rewards/* =
    β·mean log-prob, logps/* (mean per token), nll_loss (computed even when cpo_alpha = 0; TRL logs 0).
    """

    beta: float
    gamma: float = 0.5
    cpo_alpha: float = 0.0
    needs_reference: bool = False
    needs_reference_tokens: bool = False

    def __call__(self, policy: dict[str, torch.Tensor], ref: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        B = batch["n_pairs"]
        sums, avg = _mean_logps(policy, batch)
        lengths = batch["n_tokens"].to(sums.device).to(sums.dtype)
        nll = dpo.chosen_nll(sums[:B], lengths[:B])
        loss = simpo.simpo_loss(avg[:B], avg[B:], self.beta, self.gamma).mean()
        if self.cpo_alpha:
            loss = loss + self.cpo_alpha * nll
        metrics = _pair_metrics(self.beta * avg[:B], self.beta * avg[B:], avg[:B], avg[B:])
        metrics["nll_loss"] = nll.detach()
        return loss, metrics


Objective = DPOObjective | KTOObjective | ORPOObjective | SimPOObjective

SIMPO_DEFAULT_BETA = 2.0  # SimPO paper's range is 2.0–2.5; TRL's CPOConfig default (0.1) is CPO's.


def _explicit_beta(cfg: ReinforgeConfig) -> float | None:
    if cfg.rl_beta is not None:
        return cfg.rl_beta
    return cfg.trl.beta


def build_objective(cfg: ReinforgeConfig) -> Objective:
    """The objective for `cfg.rl` (dpo, ipo, kto, orpo, simpo), with every config value resolved to a float.

    Defaults: β 0.1 (SimPO 2.0); kto weights 1.0; orpo_alpha 0.1 (or rl_beta/trl.beta when only those
    are set, as Axolotl); simpo_gamma 0.5; cpo_alpha 0.0; dpo_discopop_tau 0.05.
    Raises: ValueError for a method without an offline objective.
    """
    if cfg.rl in ("dpo", "ipo"):
        return DPOObjective(
            beta=cfg.beta,
            label_smoothing=cfg.dpo_label_smoothing or 0.0,
            loss_types=tuple(cfg.dpo_loss_types_value),
            loss_weights=tuple(cfg.dpo_loss_weights_value),
            rpo_alpha=cfg.rpo_alpha,
            use_weighting=bool(cfg.dpo_use_weighting),
            ld_alpha=cfg.ld_alpha,
            discopop_tau=cfg.dpo_discopop_tau if cfg.dpo_discopop_tau is not None else 0.05,
            bco_running_mean=cfg.dpo_bco_running_mean is not False,
        )
    if cfg.rl == "kto":
        return KTOObjective(
            beta=cfg.beta,
            desirable_weight=cfg.kto_desirable_weight if cfg.kto_desirable_weight is not None else 1.0,
            undesirable_weight=cfg.kto_undesirable_weight if cfg.kto_undesirable_weight is not None else 1.0,
        )
    if cfg.rl == "orpo":
        alpha = cfg.orpo_alpha if cfg.orpo_alpha is not None else _explicit_beta(cfg)
        return ORPOObjective(alpha=0.1 if alpha is None else alpha)
    if cfg.rl == "simpo":
        beta = _explicit_beta(cfg)
        return SimPOObjective(
            beta=SIMPO_DEFAULT_BETA if beta is None else beta,
            gamma=cfg.simpo_gamma if cfg.simpo_gamma is not None else 0.5,
            cpo_alpha=cfg.cpo_alpha if cfg.cpo_alpha is not None else 0.0,
        )
    raise ValueError(f"rl: {cfg.rl} has no offline objective")


__all__ = ["DPOObjective", "KTOObjective", "ORPOObjective", "SimPOObjective", "RunningMean", "build_objective",
           "Objective"]
