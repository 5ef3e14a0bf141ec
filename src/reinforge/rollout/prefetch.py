"""Background production of rollouts (`trl.async_prefetch`): one worker thread runs the producer for rollouts
that training will need next, while the main thread trains on the current one.

The worker only calls the job it is given (the producer: generate and score), so it runs no collectives, never
touches the training module and uses no global RNG (`RolloutProducer.thread_safe` must hold). Everything else —
weight syncs, broadcasting results to the other processes, preparation — stays on the main thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger(__name__)


class Prefetcher:
    """Rollout jobs keyed by rollout index, run one at a time in submission order by a single worker thread.

    `submit(index, job)` queues `job()`; `take(index)` returns its result (re-raising the job's exception) and the
    seconds the caller waited; `drain()` waits for every queued job without removing it; `close()` cancels
    what has not started and waits for the running job (bounded by the backend's own request timeout).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reinforge-rollout")
        self._jobs: dict[int, Future] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, index: int, job: Callable[[], Any]) -> None:
        """Queue `job` as rollout `index`. Raises ValueError if that index is already queued."""
        if index in self._jobs:
            raise ValueError(f"rollout {index} is already queued")
        self._jobs[index] = self._pool.submit(job)

    def put(self, index: int, result: Any) -> None:
        """Hold an already produced result as rollout `index` (from a checkpoint)."""
        future: Future = Future()
        future.set_result(result)
        self._jobs[index] = future

    def in_flight(self) -> bool:
        """Whether a queued job has not finished yet."""
        return any(not f.done() for f in self._jobs.values())

    def take(self, index: int) -> tuple[Any, float]:
        """(result of rollout `index`, seconds waited for it); it leaves the queue. Raises KeyError when it was never
        queued, or the job's own exception."""
        future = self._jobs.pop(index)
        t0 = time.perf_counter()
        result = future.result()
        return result, time.perf_counter() - t0

    def drain(self) -> dict[int, Any]:
        """Wait for every queued job; returns {index: result} of those that succeeded, in index order (failed jobs
        are dropped from the queue: they will be produced again)."""
        done: dict[int, Any] = {}
        for index in sorted(self._jobs):
            try:
                done[index] = self._jobs[index].result()
            except Exception as exc:  # noqa: BLE001 - it resurfaces when the rollout is produced again
                log.warning("prefetched rollout %d failed (%s: %s); it will be produced again", index,
                            type(exc).__name__, exc)
                del self._jobs[index]
        return done

    def close(self) -> None:
        """Cancel the queued jobs that have not started; wait for the running one."""
        for future in self._jobs.values():
            future.cancel()
        self._jobs.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
