"""The main-thread step after a rollout is produced: rewards gathered across processes, advantages, the padded
batch, the no-grad old-policy and reference forwards, the sampler importance weights and the rollout metrics.

With several processes each process holds whole prompt groups; the rewards of all processes are gathered before
the advantages are computed, so "batch" scaling and GDPO's batch normalisation use the global batch, and each
process keeps its own slice (as TRL). Reward and length metrics are computed on the gathered values. Every
process must call `prepare` together (collectives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from reinforge.algorithms.advantages import compute_advantages, reward_metrics
from reinforge.algorithms.importance_sampling import sampler_importance_weights, sampler_metrics
from reinforge.algorithms.logprobs import split_to_padded
from reinforge.data.collate import pad_sequences
from reinforge.rollout.types import Rollout
from reinforge.training.distributed import gather_rows, sum_across, world


@dataclass
class RolloutBatch:
    """N = prompts × num_generations completions, prompt-major, ready for the policy loss.

    batch: collate tensors (see reinforge.data.collate) of prompt+completion sequences.
    mask: [N, T] completion tokens in the loss (the rollout's loss_mask; 0 rows for masked truncated completions).
    advantages: [N]; old_logps / ref_logps: [N, T] or None.
    metrics: rollout metrics (TRL names); table: per-completion rows for completion logs.
    loss_tokens: loss tokens (mask entries) of the rollout per process, averaged over processes: the
        `num_items_in_batch` basis of the "dapo" aggregation.
    sampler_weights: [N, T] or [N, 1] importance weights π_old/μ (None: no correction).
    sampler_logps: [N, T] the sampler's log-probs (None when the backend gave none).
    correction: set when the importance weights are left to the training forward (on-policy rollouts, see
        `RolloutPreparer`): the loss computes them from its own detached log-probs as π_old.
    policy_version: optimiser steps of the weights that sampled it.
    ce_first: reference rows (EBFT structured `ce_coef`): `batch` holds, after the N completion rows, one row of
        prompt + ground truth per prompt group (its ground-truth tokens scored); `ce_first[k]` is the index of the
        first completion of reference row k's group. Empty: no reference rows.
    ce_tokens: scored tokens of all reference rows of the rollout.
    ce_norm: the cross-entropy's normalisation: the rollout's reference tokens × this batch's share of its
        completions (a micro-batch's expected number of ground-truth tokens).
    """

    batch: dict[str, torch.Tensor]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict[str, float]
    table: list[dict[str, Any]] = field(default_factory=list)
    loss_tokens: float = 0.0
    sampler_weights: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    correction: "SamplerCorrectionSpec | None" = None
    policy_version: int = 0
    ce_first: list[int] = field(default_factory=list)
    ce_tokens: float = 0.0
    ce_norm: float = 0.0

    @property
    def size(self) -> int:
        return self.advantages.shape[0]

    @property
    def has_signal(self) -> bool:
        """Whether the micro-batch has a gradient at all: some advantage ≠ 0, or reference rows (their CE)."""
        return bool(self.advantages.ne(0).any()) or bool(self.ce_first)

    def micro_batch(self, start: int, size: int) -> "RolloutBatch":
        """Completions [start, start+size) as a RolloutBatch of their own (rows re-padded), with the reference rows
        of the prompt groups whose first completion is among them."""
        sl = slice(start, start + size)
        refs = [k for k, first in enumerate(self.ce_first) if start <= first < start + size]
        idx = torch.tensor(list(range(self.size))[sl] + [self.size + k for k in refs], dtype=torch.long)
        lengths = self.batch["n_tokens"][sl]
        keep = self.batch["attention_mask"][idx].sum(1).max()
        sub = {k: v[idx, :keep] for k, v in self.batch.items() if k != "n_tokens"}
        rows = torch.arange(sub["seq_index"].shape[0]).unsqueeze(1)
        sub["seq_index"] = torch.where(sub["seq_index"] >= 0, rows.expand_as(sub["seq_index"]), -1)
        sub["n_tokens"] = self.batch["n_tokens"][idx]
        T = max(int(lengths.max()), 1)
        cut = lambda t: None if t is None else t[sl, :T] if t.shape[-1] != 1 else t[sl]  # noqa: E731
        return RolloutBatch(sub, self.mask[sl, :T], self.advantages[sl], cut(self.old_logps), cut(self.ref_logps), {},
                            loss_tokens=self.loss_tokens, sampler_weights=cut(self.sampler_weights),
                            sampler_logps=cut(self.sampler_logps), correction=self.correction,
                            policy_version=self.policy_version, ce_first=[self.ce_first[k] - start for k in refs],
                            ce_tokens=self.ce_tokens, ce_norm=self.ce_tokens * len(lengths) / self.size)


def per_token(out: dict[str, torch.Tensor], n_tokens: torch.Tensor, key: str = "token_logps") -> torch.Tensor:
    """LogpsModel output → per-token values [S, T] (right-padded with 0): log-probs, or another [N] output
    such as `token_entropy`."""
    return split_to_padded(out[key], n_tokens)[0]


def pad_per_token(rows: list[list[float]], width: int, fill: float = 0.0) -> torch.Tensor:
    """Per-token lists → [N, width] float32, right-padded with `fill`."""
    out = torch.full((len(rows), width), fill, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


@dataclass(frozen=True)
class SamplerCorrectionSpec:
    """How to correct for the sampler: mode (IS_MODES), cap_max, cap_min (floats or None)."""

    mode: str
    cap_max: float | None
    cap_min: float | None = None


class RolloutPreparer:
    """Turns a produced `Rollout` into a `RolloutBatch` on the main thread (see module docstring).

    Args:
        pad_token_id: padding id of the batch.
        reward_weights: K weights; scale_rewards / aggregation: `compute_advantages` arguments.
        mask_truncated: drop truncated completions from the loss.
        correction: sampler importance-sampling settings, or None (off). Applied only to rollouts with sampler
            log-probs.
        old_from_training: the rollout is trained once, within one optimiser step, by the weights that prepare it
            (num_iterations 1, its micro-batches inside one accumulation window): then π_old is the training
            forward's own log-probs, so no old-policy forward runs here and the weights are computed in the loss
            (`RolloutBatch.correction`); the same numbers for one forward less.
        reference_ids: row → its ground-truth token ids (EBFT structured with `ce_coef` > 0), or None. When set,
            the training batch gets one reference row per prompt group (`RolloutBatch.ce_first`), scored on the
            ground truth; the no-grad forwards here run on the completions only.
    """

    def __init__(self, pad_token_id: int, reward_weights: list[float], *, scale_rewards, aggregation: str,
                 mask_truncated: bool, correction: SamplerCorrectionSpec | None = None,
                 old_from_training: bool = False, reference_ids: Callable[[dict[str, Any]], list[int]] | None = None):
        self.pad_token_id = pad_token_id
        self.reward_weights = torch.tensor(reward_weights, dtype=torch.float32)
        self.scale_rewards, self.aggregation = scale_rewards, aggregation
        self.mask_truncated, self.correction, self.old_from_training = mask_truncated, correction, old_from_training
        self.reference_ids = reference_ids

    def corrects(self, rollout: Rollout) -> bool:
        """Whether this rollout gets sampler importance weights."""
        return self.correction is not None and rollout.sampler_logps is not None

    def needs_old_logps(self, rollout: Rollout) -> bool:
        """Whether the correction needs the old-policy forward for this rollout."""
        return self.corrects(rollout) and not self.old_from_training

    def prepare(self, rollout: Rollout, policy_logps: Callable | None, ref_logps: Callable | None) -> RolloutBatch:
        """Advantages, batch, forwards, weights and metrics of `rollout` (collective: every process calls it).

        policy_logps / ref_logps: callables batch → LogpsModel output (no grad), or None when unused; the
        old-policy forward also runs when the sampler correction needs it. Old log-probs saved in
        `rollout.old_logps` (replayed groups) replace the forward's for their completions.
        """
        G, rewards = rollout.num_generations, rollout.rewards
        rank, world_size = world()
        n = rewards.shape[0]
        all_rewards = gather_rows(rewards)  # [N × processes, K]: whole groups, process-major
        adv_all = compute_advantages(all_rewards, self.reward_weights, G, self.scale_rewards, self.aggregation)
        advantages = adv_all.advantages[rank * n:(rank + 1) * n]
        batch = pad_sequences([(p + c, len(p)) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)],
                              self.pad_token_id)
        _, mask = split_to_padded(torch.zeros(int(batch["n_tokens"].sum())), batch["n_tokens"])
        T = mask.shape[1]
        mask = mask & (pad_per_token(rollout.loss_mask, T) > 0.5)
        truncated = torch.tensor(rollout.truncated)
        if self.mask_truncated:
            mask = mask & ~truncated.unsqueeze(1)
        correct = self.corrects(rollout)
        if correct and policy_logps is None and (not self.old_from_training or rollout.old_logps is not None):
            raise ValueError("the sampler correction needs the old-policy forward (policy_logps)")
        old = per_token(policy_logps(batch), batch["n_tokens"]).detach() if policy_logps is not None else None
        if old is not None and rollout.old_logps is not None:  # replayed groups that kept theirs
            for i, row in enumerate(rollout.old_logps):
                if row is not None:
                    old[i, :len(row)] = torch.tensor(row, dtype=old.dtype)
        ref = per_token(ref_logps(batch), batch["n_tokens"]).detach() if ref_logps else None
        metrics: dict[str, float] = {}
        weights, deferred = None, None
        sampler = pad_per_token(rollout.sampler_logps, T) if rollout.sampler_logps is not None else None
        if correct and old is None:
            deferred = self.correction  # the loss weighs with its own detached log-probs (old_from_training)
        elif correct:
            c = self.correction
            corr = sampler_importance_weights(old, sampler, mask, mode=c.mode, cap_max=c.cap_max, cap_min=c.cap_min)
            weights = corr.weights
            metrics.update({k: float(v) for k, v in sampler_metrics(corr, old, sampler, mask).items()})
        lengths = gather_rows(torch.tensor([float(sum(m)) for m in rollout.loss_mask]))
        truncated_all = gather_rows(truncated.float()) > 0.5
        term = lengths[~truncated_all] if (~truncated_all).any() else torch.zeros(1)
        metrics.update({
            **reward_metrics(all_rewards, self.reward_weights, adv_all.std, rollout.reward_names),
            "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated_all.float().mean().item(),
            "completions/mean_terminated_length": term.mean().item(),
            "time/generation": rollout.timings.get("generation", 0.0), "time/scoring": rollout.timings.get("scoring", 0.0),
            **rollout.metrics,
        })
        table = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": t,
                  **{name: rewards[i, k].item() for k, name in enumerate(rollout.reward_names)},
                  "advantage": advantages[i].item()}
                 for i, (p, t) in enumerate(zip(rollout.prompts(), rollout.texts))]
        loss_tokens = float(sum_across(mask.sum().double())) / world_size
        ce_first, ce_tokens = [], 0.0
        if self.reference_ids is not None:  # + one prompt + ground-truth row per group, after the completions
            refs = [(rollout.prompt_ids[g * G] + self.reference_ids(row), len(rollout.prompt_ids[g * G]))
                    for g, row in enumerate(rollout.rows)]
            seqs = [(p + c, len(p)) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)] + refs
            batch = pad_sequences(seqs, self.pad_token_id)
            ce_first = [g * G for g in range(len(refs))]
            ce_tokens = float(batch["n_tokens"][n:].sum())
        return RolloutBatch(batch, mask, advantages, old, ref, metrics, table, loss_tokens=loss_tokens,
                            sampler_weights=weights, sampler_logps=sampler, correction=deferred,
                            policy_version=rollout.policy_version, ce_first=ce_first, ce_tokens=ce_tokens,
                            ce_norm=ce_tokens)
