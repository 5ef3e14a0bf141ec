"""`RolloutStream`: micro-batches cut from successive rollouts, with a position a checkpoint can record.

Rollout j reads prompt batch j of a `BatchPlan` and samples with the seed `rollout_seed(seed, j, process)`, so a
resumed run regenerates the same completions (exactly in-process; on a vLLM server see
`reinforge.rollout.vllm`). Before a rollout is produced, `before_produce(drain)` syncs the backend's weights when
due (calling `drain()` first, so that no generation is in flight while the weights change) and returns the policy
version the rollout is sampled from.

Synchronous (`prefetch_depth` 0): each process produces its own prompts when it needs them. Asynchronous
(`prefetch_depth` d ≥ 1, `trl.async_prefetch`): the main process produces the rollouts of every process in one
background thread (`Prefetcher`), up to d rollouts ahead of training; when a rollout is needed the main thread
takes it (waiting if it is not ready) and broadcasts each process its part, then queues the next ones. A
prefetched rollout more than `max_staleness` versions behind the current policy is dropped and produced again.

Then, on every process: zero-signal groups are replaced from the replay buffer, the rollout is prepared (main
thread: collectives, forwards) and its groups with signal are kept for replay; the holder of the prompts
buffers the prompts that failed every completion for a later re-roll. A checkpoint holds the partly consumed
rollout, the prefetched ones (waited for) and both buffers, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable

import torch

from reinforge.rollout.curate import ReplayBuffer, RerollBuffer
from reinforge.rollout.prefetch import Prefetcher
from reinforge.rollout.prepare import RolloutBatch, RolloutPreparer
from reinforge.rollout.producer import RolloutProducer
from reinforge.rollout.types import Rollout
from reinforge.training.distributed import BatchPlan, broadcast_from_main

log = logging.getLogger(__name__)


def rollout_seed(seed: int, index: int, rank: int) -> int:
    """The sampling seed of rollout `index` on process `rank` of a run seeded with `seed` (63-bit)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{rank}".encode()).digest()[:8], "big") >> 1


def _describe(exc: Exception) -> tuple[bool, str]:
    """(is a VLLMError, message) of a producer failure: what the other processes need to raise it (picklable)."""
    from reinforge.rollout.vllm import VLLMError

    return isinstance(exc, VLLMError), f"{exc}" if isinstance(exc, VLLMError) else f"{type(exc).__name__}: {exc}"


def _follower_error(server: bool, message: str) -> Exception:
    """The main process's producer failure as raised on another process (a VLLMError stays one)."""
    from reinforge.rollout.vllm import VLLMError

    return VLLMError(message) if server else RuntimeError(f"the main process failed to produce a rollout: {message}")


def _generator(seed: int, index: int, rank: int, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{index}:{rank}:{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class RolloutStream:
    """Endless (rollout, micro-batch) pairs; each rollout is optimised `num_iterations` times.

    `position` = {"rollouts": made so far, "offset": micro-batches of the latest rollout consumed}; `state()` is
    what a checkpoint must keep to continue exactly (see module docstring).

    Args:
        plan: prompt batches (per process: prompts of one rollout; drop_last).
        prompts: the prompt rows; producer: a RolloutProducer; preparer: a RolloutPreparer.
        micro_batch_size: completions per micro-batch; num_iterations: passes over each rollout.
        policy_fn / ref_fn: no-grad forwards for old / reference log-probs (None when unused; policy_fn is still
            used when the sampler correction or a replayed group needs old log-probs, so pass it whenever it may be).
        on_rollout: called with each new prepared rollout (metrics, completion logs).
        old_always: compute old log-probs for every rollout (num_iterations > 1, async, kept replay log-probs).
        before_produce: `before_produce(drain) -> version` (see module docstring).
        current_version: the policy version now (optimiser steps taken), for staleness.
        prefetch_depth: 0 synchronous, d ≥ 1 rollouts produced ahead in a background thread.
        max_staleness: drop prefetched rollouts more versions behind than this (None: keep all).
        replay: a ReplayBuffer or None; reroll: a RerollBuffer or None, given to the processes that choose prompts
            (every process when synchronous, the main one when asynchronous).
        main_scorer: scores each process's part of a rollout on the main thread before it is prepared (EBFT's
            feature matching, which runs the training module); returns metrics. None: the producer's rewards.
        position, state: from a checkpoint, to continue exactly.
    Raises:
        ValueError: async with a producer that is not thread-safe, or a partly consumed rollout without state.
    """

    def __init__(self, plan: BatchPlan, prompts: list[dict[str, Any]], producer: RolloutProducer,
                 preparer: RolloutPreparer, micro_batch_size: int, num_iterations: int, seed: int,
                 policy_fn: Callable | None, ref_fn: Callable | None, on_rollout: Callable[[RolloutBatch], None], *,
                 old_always: bool, before_produce: Callable[[Callable[[], None]], int] = lambda drain: 0,
                 current_version: Callable[[], int] = lambda: 0, prefetch_depth: int = 0,
                 max_staleness: int | None = None, replay: ReplayBuffer | None = None,
                 reroll: RerollBuffer | None = None, main_scorer: Callable[[Rollout], dict[str, float]] | None = None,
                 position: dict[str, int] | None = None,
                 state: dict[str, Any] | RolloutBatch | None = None):
        self.plan, self.prompts, self.producer, self.preparer, self.seed = plan, prompts, producer, preparer, seed
        self.micro_batch_size, self.num_iterations = micro_batch_size, num_iterations
        self.policy_fn, self.ref_fn, self.on_rollout = policy_fn, ref_fn, on_rollout
        self.old_always, self.before_produce, self.current_version = old_always, before_produce, current_version
        self.depth, self.max_staleness = prefetch_depth, max_staleness
        self.replay, self.reroll, self.main_scorer = replay, reroll, main_scorer
        self.per_rollout = plan.per_process * producer.params.n // micro_batch_size
        self.rollouts = (position or {}).get("rollouts", 0)
        self.offset = (position or {}).get("offset", 0)
        self.is_main = plan.rank == 0
        if self.depth and self.is_main and not producer.thread_safe:
            raise ValueError(f"async prefetch runs the producer in a background thread, but the {producer.backend.name} "
                             f"backend (or the rollout function) is not thread-safe")
        self.prefetcher = Prefetcher() if self.depth and self.is_main else None
        state = {"current": state} if isinstance(state, RolloutBatch) else (state or {})
        self.current: RolloutBatch | None = state.get("current")
        if self.prefetcher is not None:
            for index, parts in (state.get("pending") or {}).items():
                self.prefetcher.put(index, parts)
        if self.replay is not None and state.get("replay"):
            self.replay.load_state_dict(state["replay"])
        if self.reroll is not None and state.get("reroll"):
            self.reroll.load_state_dict(state["reroll"])
        self._injected = 0  # re-rolled prompts injected since the last rollout's metrics
        if self.current is None and 0 < self.offset < self.per_rollout * num_iterations:
            raise ValueError("a partly consumed rollout needs its saved state to continue")

    @property
    def main_produces(self) -> bool:
        """Whether the main process produces every process's rollouts (async), so the others never sample."""
        return self.depth > 0

    @property
    def position(self) -> dict[str, int]:
        return {"rollouts": self.rollouts, "offset": self.offset}

    @property
    def consumed(self) -> int:
        """Rollouts whose micro-batches have all been consumed."""
        return self.rollouts - (1 if self._partial() is not None else 0)

    def _partial(self) -> RolloutBatch | None:
        return self.current if 0 < self.offset < self.per_rollout * self.num_iterations else None

    def state(self) -> dict[str, Any]:
        """The loop state a checkpoint keeps: the partly consumed rollout, the prefetched rollouts (this waits for
        them) and the replay / re-roll buffers."""
        out: dict[str, Any] = {"current": self._partial()}
        if self.prefetcher is not None:
            out["pending"] = self.prefetcher.drain()
        if self.replay is not None:
            out["replay"] = self.replay.state_dict()
        if self.reroll is not None:
            out["reroll"] = self.reroll.state_dict()
        return out

    def close(self) -> None:
        """Stop the background producer (cancels queued rollouts; waits for the one being generated)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    def current_rows(self) -> list[int]:
        """Prompt-row indices (all processes) of the current rollout."""
        return self.plan.global_rows(max(self.rollouts - 1, 0))

    def __iter__(self) -> "RolloutStream":
        return self

    def __next__(self) -> tuple[RolloutBatch, RolloutBatch]:
        if self.current is None or self.offset >= self.per_rollout * self.num_iterations:
            self.current = self._next_rollout()
            self.rollouts += 1
            self.offset = 0
            self.on_rollout(self.current)
        start = (self.offset % self.per_rollout) * self.micro_batch_size
        self.offset += 1
        return self.current, self.current.micro_batch(start, self.micro_batch_size)

    # ------------------------------------------------------------------ producing
    def _row_ids(self, index: int, rank: int, step: int) -> list[int]:
        """Dataset indices of rollout `index`'s prompts on process `rank` (re-rolled prompts injected)."""
        rows = self.plan.global_rows(index)
        rows = rows if self.plan.world_size == 1 else rows[rank * self.plan.per_process:(rank + 1) * self.plan.per_process]
        if self.reroll is not None:
            rows, injected = self.reroll.inject(rows, step)
            self._injected += injected
        return rows

    def _produce(self, index: int, rank: int, version: int, row_ids: list[int]) -> Rollout:
        rollout = self.producer.produce([self.prompts[i] for i in row_ids], rollout_seed(self.seed, index, rank), version)
        rollout.row_ids = list(row_ids)
        return rollout

    def _job(self, index: int) -> Callable[[], list[Rollout]]:
        """Choose the prompts of every process's part of rollout `index` now (main thread); the returned job
        produces them (background thread)."""
        version = self.before_produce(self.drain)
        ranks = range(self.plan.world_size)
        row_ids = [self._row_ids(index, r, self.current_version()) for r in ranks]
        return lambda: [self._produce(index, r, version, row_ids[r]) for r in ranks]

    def drain(self) -> None:
        """Wait for the rollouts in flight (async); none start again until the next `next()`."""
        if self.prefetcher is not None:
            self.prefetcher.drain()


    def _take(self, index: int) -> tuple[Rollout, dict[str, float]]:
        """This process's part of rollout `index` and the producing metrics."""
        metrics: dict[str, float] = {}
        if not self.depth:
            version = self.before_produce(self.drain)
            row_ids = self._row_ids(index, self.plan.rank, self.current_version())
            rollout = self._produce(index, self.plan.rank, version, row_ids)
            parts = [rollout]
        else:
            parts, failure = None, None
            if self.is_main:
                try:
                    parts, metrics = self._take_prefetched(index)
                except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
                    failure = exc
            status = broadcast_from_main(("ok", parts) if failure is None else ("failed", _describe(failure)))
            if status[0] == "failed":  # every process stops the same way (a server error checkpoints on all)
                raise failure if failure is not None else _follower_error(*status[1])
            parts = status[1]
            rollout = parts[self.plan.rank] if len(parts) > 1 else parts[0]
        if self.reroll is not None:  # held by the process that chooses the prompts: buffer its failed ones
            metrics["reroll_buffered"] = float(sum(self.reroll.record(p) for p in parts))
            metrics["reroll_buffer_size"] = float(len(self.reroll))
            metrics["reroll_injected"], self._injected = float(self._injected), 0
        return rollout, metrics

    def _take_prefetched(self, index: int) -> tuple[list[Rollout], dict[str, float]]:
        """Main process, async: every process's part of rollout `index` (produced again when too stale), then the
        next rollouts queued."""
        if index not in self.prefetcher:
            self.prefetcher.submit(index, self._job(index))
        parts, waited = self.prefetcher.take(index)
        stale = self.current_version() - parts[0].policy_version
        dropped = self.max_staleness is not None and stale > self.max_staleness
        if dropped:  # sampled too long ago: produce it again from the current weights
            log.info("rollout %d is %d versions stale (max_staleness %d): sampling it again", index, stale,
                     self.max_staleness)
            self.prefetcher.submit(index, self._job(index))
            parts, more = self.prefetcher.take(index)
            waited += more
        for j in range(index + 1, index + 1 + self.depth):
            if j not in self.prefetcher:
                self.prefetcher.submit(j, self._job(j))
        return parts, {"time/rollout_wait": waited, "sample/dropped_stale_total": float(dropped)}

    def _next_rollout(self) -> RolloutBatch:
        index = self.rollouts
        rollout, metrics = self._take(index)
        if self.main_scorer is not None:
            metrics.update(self.main_scorer(rollout))
        fresh = [True] * len(rollout.rows)
        if self.replay is not None:
            fresh = self.replay.replace_zero_signal(rollout, _generator(self.seed, index, self.plan.rank, "replay"))
        need_old = self.old_always or self.preparer.needs_old_logps(rollout) or rollout.old_logps is not None
        batch = self.preparer.prepare(rollout, self.policy_fn if need_old else None, self.ref_fn)
        if self.replay is not None:
            self.replay.add(rollout, batch.advantages, batch.old_logps, fresh)
            metrics["replay_buffer_replacements"] = float(fresh.count(False))
            metrics["replay_buffer_size"] = float(len(self.replay))
        now = self.current_version()
        stale = [now - v for v in rollout.completion_versions()]
        metrics["sample/staleness_mean"] = sum(stale) / len(stale)
        metrics["sample/staleness_max"] = float(max(stale))
        batch.metrics.update(metrics)
        return batch
