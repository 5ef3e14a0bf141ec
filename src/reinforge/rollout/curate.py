"""Getting more learning signal out of rollouts: a replay buffer of prompt groups that had signal, and deferred
re-rolls of prompts that failed every completion (Axolotl's async-GRPO keys `replay_buffer_size` and
`reroll_start_fraction`).

A prompt group is the G completions of one prompt. Its signal is zero when every reward function gave all G
completions the same reward: its advantages are then all zero and it teaches nothing.

- `ReplayBuffer` (per process, main thread): after a rollout is prepared, its groups with signal are kept, scored
  by Σ_j |A_j| × Σ_k std_j(r_jk) (advantages and per-function reward standard deviations of the group); before
  the next rollouts are prepared, their zero-signal groups are replaced by kept groups drawn in proportion to that
  score (a seeded `torch.Generator`: no global RNG) and removed from the buffer. A full buffer drops its
  lowest-scored group.
- `RerollBuffer` (held by whoever chooses the prompts of a rollout): prompts whose completions all scored 0 on
  every function are buffered; from the start step on, up to `max_groups` of them replace the last prompts of
  later rollouts (oldest first). Axolotl buffers them but never re-injects them (its hook is never called); here
  they come back.

Both are plain state, saved in checkpoints (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reinforge.rollout.types import Rollout


def group_reward_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per-group, per-function standard deviation of the rewards (unbiased, NaN rewards as 0).

    Args: rewards [P·G, K] prompt-major; num_generations G ≥ 2. Returns: [P, K].
    """
    r = torch.nan_to_num(rewards.float(), nan=0.0)
    return r.view(-1, num_generations, r.shape[-1]).std(dim=1)


def replay_scores(rewards: torch.Tensor, advantages: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Replay score of each prompt group: Σ_j |A_j| · Σ_k std_j(r_jk) (0 for a group without signal).

    Args: rewards [P·G, K]; advantages [P·G] (or [P·G, T]: summed over T first); num_generations G.
    Returns: [P] float32, ≥ 0.
    """
    adv = advantages.float().abs()
    if adv.dim() > 1:
        adv = adv.sum(-1)
    return adv.view(-1, num_generations).sum(1) * group_reward_std(rewards, num_generations).sum(1)


def zero_signal_groups(rewards: torch.Tensor, num_generations: int) -> list[int]:
    """Indices of the prompt groups whose every reward function gave all completions the same reward."""
    return [i for i, s in enumerate(group_reward_std(rewards, num_generations).sum(1).tolist()) if s == 0.0]


def failed_groups(rewards: torch.Tensor, num_generations: int) -> list[int]:
    """Indices of the prompt groups whose completions all scored 0 (or None) on every reward function (none when
    there are no reward columns)."""
    if rewards.shape[-1] == 0:
        return []
    r = torch.nan_to_num(rewards.float(), nan=0.0).view(-1, num_generations, rewards.shape[-1])
    return [i for i, z in enumerate((r == 0).flatten(1).all(1).tolist()) if z]


@dataclass
class ReplayGroup:
    """One kept prompt group: G completions of one prompt with everything the loss needs again."""

    score: float
    row: dict[str, Any]
    row_id: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    loss_mask: list[list[int]]
    sampler_logps: list[list[float]] | None
    truncated: list[bool]
    texts: list[str]
    rewards: torch.Tensor  # [G, K]
    versions: list[int]
    old_logps: list[list[float]] | None


class ReplayBuffer:
    """Prompt groups with signal, replayed in place of zero-signal groups (see module docstring).

    Args:
        capacity: groups kept at most (≥ 1).
        keep_old_logps: keep each group's old-policy log-probs and reuse them when it is replayed
            (`replay_recompute_logps: false`); else they are recomputed with the current policy.
    """

    def __init__(self, capacity: int, keep_old_logps: bool = False):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1; got {capacity}")
        self.capacity, self.keep_old_logps = capacity, keep_old_logps
        self.groups: list[ReplayGroup] = []

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, rollout: Rollout, advantages: torch.Tensor, old_logps: torch.Tensor | None,
            fresh: list[bool]) -> int:
        """Keep the fresh groups of a prepared rollout that have signal; returns how many were added.

        Args:
            rollout: the rollout as prepared (N = P·G completions).
            advantages: [N] its advantages; old_logps: [N, T] old-policy log-probs or None.
            fresh: P flags, False for groups that were themselves replayed (never kept twice).
        """
        G = rollout.num_generations
        scores = replay_scores(rollout.rewards, advantages, G).tolist()
        versions = rollout.completion_versions()
        added = 0
        for g, (score, is_fresh) in enumerate(zip(scores, fresh)):
            if not is_fresh or score <= 0.0:
                continue
            sl = slice(g * G, (g + 1) * G)
            old = None
            if self.keep_old_logps and old_logps is not None:
                old = [old_logps[i, :len(rollout.completion_ids[i])].tolist() for i in range(sl.start, sl.stop)]
            self.groups.append(ReplayGroup(
                score=float(score), row=rollout.rows[g], row_id=rollout.row_ids[g] if rollout.row_ids else -1,
                prompt_ids=rollout.prompt_ids[sl], completion_ids=rollout.completion_ids[sl],
                loss_mask=rollout.loss_mask[sl],
                sampler_logps=None if rollout.sampler_logps is None else rollout.sampler_logps[sl],
                truncated=rollout.truncated[sl], texts=rollout.texts[sl], rewards=rollout.rewards[sl].clone(),
                versions=versions[sl], old_logps=old))
            added += 1
        if len(self.groups) > self.capacity:  # drop the lowest scores; the earliest kept among equals
            order = sorted(range(len(self.groups)), key=lambda i: (-self.groups[i].score, i))[: self.capacity]
            self.groups = [self.groups[i] for i in sorted(order)]
        return added

    def replace_zero_signal(self, rollout: Rollout, generator: torch.Generator) -> list[bool]:
        """Replace the rollout's zero-signal groups (in place) by kept groups drawn ∝ score without replacement;
        drawn groups leave the buffer. Returns P flags: True for the groups that are the rollout's own (fresh).

        A replayed group keeps its rewards, sampler log-probs and policy versions; when the buffer keeps old
        log-probs they ride along in `rollout.old_logps`. Groups without sampler log-probs cannot replace groups
        of a rollout that has them (and vice versa): those draws are skipped.
        """
        G = rollout.num_generations
        P = len(rollout.rows)
        fresh = [True] * P
        zero = zero_signal_groups(rollout.rewards, G)
        usable = [i for i, grp in enumerate(self.groups)
                  if (grp.sampler_logps is None) == (rollout.sampler_logps is None)]
        k = min(len(zero), len(usable))
        if k == 0:
            return fresh
        weights = torch.tensor([self.groups[i].score for i in usable], dtype=torch.float64)
        drawn = [usable[i] for i in torch.multinomial(weights, k, replacement=False, generator=generator).tolist()]
        versions = rollout.completion_versions()
        old = list(rollout.old_logps) if rollout.old_logps is not None else [None] * rollout.size
        for g, b in zip(zero, drawn):
            grp, sl = self.groups[b], slice(g * G, (g + 1) * G)
            rollout.rows[g] = grp.row
            if rollout.row_ids:
                rollout.row_ids[g] = grp.row_id
            rollout.prompt_ids[sl], rollout.completion_ids[sl] = grp.prompt_ids, grp.completion_ids
            rollout.loss_mask[sl], rollout.truncated[sl], rollout.texts[sl] = grp.loss_mask, grp.truncated, grp.texts
            if rollout.sampler_logps is not None:
                rollout.sampler_logps[sl] = grp.sampler_logps
            rollout.rewards[sl] = grp.rewards
            versions[sl] = grp.versions
            old[sl] = grp.old_logps if grp.old_logps is not None else [None] * G
            fresh[g] = False
        rollout.versions = versions
        rollout.old_logps = old if any(o is not None for o in old) else None
        for b in sorted(drawn, reverse=True):
            del self.groups[b]
        return fresh

    def state_dict(self) -> dict[str, Any]:
        return {"groups": list(self.groups)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = list(state["groups"])


class RerollBuffer:
    """Prompts that failed every completion, re-injected into later rollouts (see module docstring).

    Args: start_step: optimiser step from which buffered prompts are re-injected; max_groups: prompts replaced
    per rollout at most.
    """

    def __init__(self, start_step: int, max_groups: int):
        self.start_step, self.max_groups = start_step, max_groups
        self.row_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.row_ids)

    def record(self, rollout: Rollout, fresh: list[bool] | None = None) -> int:
        """Buffer the dataset indices of the rollout's prompts whose completions all scored 0 (fresh groups only);
        returns how many were newly buffered."""
        added = 0
        for g in failed_groups(rollout.rewards, rollout.num_generations):
            if (fresh is None or fresh[g]) and rollout.row_ids and rollout.row_ids[g] not in self.row_ids:
                self.row_ids.append(rollout.row_ids[g])
                added += 1
        return added

    def inject(self, row_ids: list[int], step: int) -> tuple[list[int], int]:
        """The prompt indices of a rollout about to be produced at optimiser step `step`, with up to max_groups
        buffered prompts (oldest first, none already among `row_ids`) in place of its last ones.
        Returns (row ids, how many were injected); before start_step the rows unchanged."""
        if step < self.start_step or not self.row_ids:
            return list(row_ids), 0
        picks = [r for r in self.row_ids if r not in row_ids][: min(self.max_groups, len(row_ids))]
        for r in picks:
            self.row_ids.remove(r)
        out = list(row_ids)
        if picks:
            out[len(out) - len(picks):] = picks
        return out, len(picks)

    def state_dict(self) -> dict[str, Any]:
        return {"row_ids": list(self.row_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.row_ids = list(state["row_ids"])
