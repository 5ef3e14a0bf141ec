"""`RolloutStream`: micro-batches cut from successive rollouts, with a position a checkpoint can record.

Rollout j reads prompt batch j of a `BatchPlan` and samples with the seed `rollout_seed(seed, j, process)`, so a
resumed run regenerates the same completions (exactly in-process; on a vLLM server see
`reinforge.rollout.vllm`). Before producing, `before_produce()` syncs the backend's weights when due and returns
the policy version the rollout is sampled from. A rollout that was only partly consumed when a checkpoint was
written is saved with it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from reinforge.rollout.prepare import RolloutBatch, RolloutPreparer
from reinforge.rollout.producer import RolloutProducer
from reinforge.training.distributed import BatchPlan


def rollout_seed(seed: int, index: int, rank: int) -> int:
    """The sampling seed of rollout `index` on process `rank` of a run seeded with `seed` (63-bit)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{rank}".encode()).digest()[:8], "big") >> 1


class RolloutStream:
    """Endless (rollout, micro-batch) pairs; each rollout is optimised `num_iterations` times.

    `position` = {"rollouts": made so far, "offset": micro-batches of the latest rollout consumed}; `state()` is
    the in-flight rollout when partly consumed.

    Args:
        plan: prompt batches (per process: prompts of one rollout; drop_last).
        prompts: the prompt rows; producer: a RolloutProducer; preparer: a RolloutPreparer.
        micro_batch_size: completions per micro-batch; num_iterations: passes over each rollout.
        policy_fn / ref_fn: no-grad forwards for old / reference log-probs (None when unused; policy_fn is still
            used when the sampler correction needs old log-probs, so pass it whenever it may be).
        old_always: compute old log-probs for every rollout (num_iterations > 1).
        before_produce: called before each rollout is produced; returns the policy version it samples from.
        on_rollout: called with each new prepared rollout (metrics, completion logs).
        position, state: from a checkpoint, to continue exactly.
    """

    def __init__(self, plan: BatchPlan, prompts: list[dict[str, Any]], producer: RolloutProducer,
                 preparer: RolloutPreparer, micro_batch_size: int, num_iterations: int, seed: int,
                 policy_fn: Callable | None, ref_fn: Callable | None, on_rollout: Callable[[RolloutBatch], None], *,
                 old_always: bool, before_produce: Callable[[], int] = lambda: 0,
                 position: dict[str, int] | None = None, state: RolloutBatch | None = None):
        self.plan, self.prompts, self.producer, self.preparer, self.seed = plan, prompts, producer, preparer, seed
        self.micro_batch_size, self.num_iterations = micro_batch_size, num_iterations
        self.policy_fn, self.ref_fn, self.on_rollout = policy_fn, ref_fn, on_rollout
        self.old_always, self.before_produce = old_always, before_produce
        self.per_rollout = plan.per_process * producer.params.n // micro_batch_size
        self.rollouts = (position or {}).get("rollouts", 0)
        self.offset = (position or {}).get("offset", 0)
        self.current = state
        if self.current is None and 0 < self.offset < self.per_rollout * num_iterations:
            raise ValueError("a partly consumed rollout needs its saved state to continue")

    @property
    def position(self) -> dict[str, int]:
        return {"rollouts": self.rollouts, "offset": self.offset}

    @property
    def consumed(self) -> int:
        """Rollouts whose micro-batches have all been consumed."""
        return self.rollouts - (1 if self.state() is not None else 0)

    def state(self) -> RolloutBatch | None:
        """The current rollout when some of its micro-batches are still to come, else None."""
        return self.current if 0 < self.offset < self.per_rollout * self.num_iterations else None

    def current_rows(self) -> list[int]:
        """Prompt-row indices (all processes) of the current rollout."""
        return self.plan.global_rows(max(self.rollouts - 1, 0))

    def __iter__(self) -> "RolloutStream":
        return self

    def __next__(self) -> tuple[RolloutBatch, RolloutBatch]:
        if self.current is None or self.offset >= self.per_rollout * self.num_iterations:
            version = self.before_produce()
            rows = [self.prompts[i] for i in self.plan.rows(self.rollouts)]
            rollout = self.producer.produce(rows, rollout_seed(self.seed, self.rollouts, self.plan.rank), version)
            need_old = self.old_always or self.preparer.needs_old_logps(rollout)
            self.current = self.preparer.prepare(rollout, self.policy_fn if need_old else None, self.ref_fn)
            self.rollouts += 1
            self.offset = 0
            self.on_rollout(self.current)
        start = (self.offset % self.per_rollout) * self.micro_batch_size
        self.offset += 1
        return self.current, self.current.micro_batch(start, self.micro_batch_size)
