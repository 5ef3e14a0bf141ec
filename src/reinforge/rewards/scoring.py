"""Score completions with reward functions, in the training process or in a pool of worker processes.

Calling convention (TRL 1.16 `GRPOTrainer`): each function is called as
`fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)` with lists
of equal length N (one entry per completion; the prompt and dataset columns repeated for each of a
prompt's completions) and returns N rewards, each a float or None (= not applicable → NaN).
Completions are strings for plain-text prompts and `[{"role": "assistant", "content": text}]` for
conversational prompts (`format_completions`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Callable, Sequence

from reinforge.rewards._worker import init_worker, run_chunk
from reinforge.rewards.calls import RewardFunctionError, call_reward
from reinforge.rewards.loading import RewardFunc

if TYPE_CHECKING:
    import torch

RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")
STARTUP_TIMEOUT_S = 600.0

logger = logging.getLogger(__name__)


def is_conversational_prompt(prompt: Any) -> bool:
    """True for a list of messages (dicts with a "role"), TRL's conversational prompt format."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def format_completions(prompts: list[Any], texts: list[str]) -> list[Any]:
    """Completions as TRL hands them to reward functions: `[{"role": "assistant", "content": text}]`
    when the prompts are conversational (judged on the first prompt, as TRL), else the plain texts.

    Args: prompts (N), texts (N decoded completions). Returns: N completions.
    """
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} completion texts")
    if prompts and is_conversational_prompt(prompts[0]):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return list(texts)


def _as_reward_funcs(funcs: Sequence[RewardFunc | Callable[..., Any]]) -> list[RewardFunc]:
    out = []
    for f in funcs:
        if isinstance(f, RewardFunc):
            out.append(f)
        elif callable(f):
            out.append(RewardFunc(spec=None, name=getattr(f, "__name__", type(f).__name__), fn=f))
        else:
            raise TypeError(f"reward functions must be RewardFunc or callables; got {type(f).__name__}")
    if not out:
        raise ValueError("no reward functions given")
    return out


def _check_inputs(prompts: list, completions: list, completion_ids: list, columns: dict[str, list]) -> int:
    n = len(completions)
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(f"prompts ({len(prompts)}), completions ({n}) and completion_ids ({len(completion_ids)}) "
                         "must have one entry per completion")
    for key, values in columns.items():
        if key in RESERVED_COLUMNS:
            raise ValueError(f"dataset column {key!r} clashes with a reward-function argument of the same name")
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"column {key!r} must be a list with one value per completion ({n}); got {got}")
    return n


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class RewardPool:
    """A pool of `num_workers` spawned processes that score completions with fixed reward functions.

    Spawned (not forked) processes run each call in their main thread, so verifiers that rely on
    `signal.alarm` (Math-Verify) keep their own timeouts. Each process loads the functions itself
    (`spec` entries are re-imported with the same search directory; callables given directly are
    pickled, so they must be module-level functions). Keep one pool for a whole run: starting it
    costs about a second per process. Use as a context manager or call `close()`.

    Scoring: for each function in turn, the N completions are split into up to `num_workers`
    contiguous chunks scored in parallel (so a function sees a chunk of the batch per call, not the
    whole batch; per-completion rewards do not depend on this).

    Timeout: with `timeout`, every call (one function on one chunk) must return within `timeout`
    seconds of being handed to a worker; otherwise the pool's processes are killed, the pool is
    closed and RewardFunctionError names the function and the chunk. A timeout is an error, never a
    NaN: the run stops.
    """

    def __init__(self, funcs: Sequence[RewardFunc | Callable[..., Any]], num_workers: int,
                 startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1; got {num_workers}")
        self.funcs = _as_reward_funcs(funcs)
        self.num_workers = num_workers
        entries: list[tuple] = []
        for f in self.funcs:
            if f.spec is not None:
                entries.append(("spec", f.spec, f.search_dir, f.name))
            else:
                entries.append(("callable", f.fn, f.name))
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        self._executor: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=num_workers, mp_context=ctx, initializer=init_worker, initargs=(entries, list(sys.path), ready))
        self._pids: list[int] = []
        # Submitting num_workers tasks makes the executor start all its processes now; each reports
        # its pid once the reward functions are loaded.
        warmups = [self._executor.submit(os.getpid) for _ in range(num_workers)]
        deadline = time.monotonic() + startup_timeout
        try:
            while len(self._pids) < num_workers:
                self._pids.append(ready.get(timeout=max(0.0, deadline - time.monotonic())))
            for w in warmups:
                w.result(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException as err:
            self._kill()
            raise RewardFunctionError(f"reward worker pool ({num_workers} processes) failed to start: {err!r}") from err

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _kill(self) -> None:
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def score_lists(self, prompts: list, completions: list, completion_ids: list, columns: dict[str, list],
                    timeout: float | None = None) -> list[list[float]]:
        """Rewards as K lists of N floats (NaN for None). Raises RewardFunctionError (see class doc)."""
        if self._executor is None:
            raise RuntimeError("this RewardPool is closed")
        n = _check_inputs(prompts, completions, completion_ids, columns)
        out: list[list[float]] = []
        for k, func in enumerate(self.funcs):
            futures = []
            for start, stop in _chunks(n, self.num_workers):
                futures.append((start, stop, self._executor.submit(
                    run_chunk, k, prompts[start:stop], completions[start:stop], completion_ids[start:stop],
                    {key: list(v[start:stop]) for key, v in columns.items()}, start, n)))
            submitted = time.monotonic()
            values: list[float] = []
            for start, stop, fut in futures:
                remaining = None if timeout is None else max(0.0, submitted + timeout - time.monotonic())
                try:
                    status, payload = fut.result(timeout=remaining)
                except TimeoutError:
                    self._kill()
                    raise RewardFunctionError(
                        f"reward function {func.name!r} timed out after {timeout} s on completions {start}..{stop - 1} "
                        f"of {n} (reward_timeout); the reward worker pool was stopped", name=func.spec or func.name
                    ) from None
                except BrokenProcessPool as err:
                    self._kill()
                    raise RewardFunctionError(
                        f"a reward worker process died while running reward function {func.name!r} on completions "
                        f"{start}..{stop - 1} of {n}: {err}", name=func.spec or func.name
                    ) from None
                if status != "ok":
                    message, exception = payload if isinstance(payload, tuple) else (payload, None)
                    raise RewardFunctionError(message, name=func.spec or func.name, exception=exception)
                values.extend(payload)
            out.append(values)
        return out


def score(funcs: Sequence[RewardFunc | Callable[..., Any]], prompts: list, completions: list,
          columns: dict[str, list] | None = None, num_workers: int = 1, timeout: float | None = None, *,
          completion_ids: list[list[int]], pool: RewardPool | None = None, dtype: "torch.dtype | None" = None,
          ) -> "torch.Tensor":
    """Rewards of N completions under K reward functions.

    Args:
        funcs: K reward functions (`load_reward_funcs` output, or callables).
        prompts: N prompts (strings or message lists), each repeated for its completions.
        completions: N completions (strings, or `[{"role": "assistant", "content": ...}]`).
        columns: dataset columns passed as keyword arguments, each a list of N values (e.g.
            {"answer": [...]}); the names prompts/completions/completion_ids are reserved.
        num_workers: 1 scores in this process; > 1 in a temporary `RewardPool` (pass `pool` to
            reuse one across steps).
        timeout: per-call limit in seconds (see RewardPool); needs worker processes, so setting it
            scores in a pool even with num_workers = 1 (a call in this process cannot be stopped).
        completion_ids: N lists of generated token ids (required: TRL passes them to every function).
        pool: an open RewardPool with the same functions; overrides num_workers.
        dtype: of the result (default float32, as TRL).
    Returns:
        [N, K] tensor; NaN where a function returned None (a row with every reward None is logged as a
        warning, as TRL does).
    Raises:
        RewardFunctionError: a function raised (message: function name, offending sample, traceback),
            returned the wrong number or type of values, or timed out.
        ValueError: inconsistent input lengths or columns.
    """
    import torch

    columns = dict(columns or {})
    rfuncs = _as_reward_funcs(funcs)
    n = _check_inputs(prompts, completions, completion_ids, columns)
    if pool is not None:
        if [f.name for f in pool.funcs] != [f.name for f in rfuncs]:
            raise ValueError("pool was built for different reward functions "
                             f"({[f.name for f in pool.funcs]} vs {[f.name for f in rfuncs]})")
        per_func = pool.score_lists(prompts, completions, completion_ids, columns, timeout)
    elif num_workers > 1 or timeout is not None:
        with RewardPool(rfuncs, num_workers) as tmp:
            per_func = tmp.score_lists(prompts, completions, completion_ids, columns, timeout)
    else:
        per_func = []
        for f in rfuncs:
            try:
                per_func.append(call_reward(f.fn, f.name, prompts, completions, completion_ids, columns))
            except RewardFunctionError as err:
                err.name = f.spec or f.name  # the configured `module.fn`, for the one-line message
                raise
    if n == 0:
        return torch.zeros(0, len(rfuncs), dtype=dtype or torch.float32)
    result = torch.tensor(per_func, dtype=dtype or torch.float32).T.contiguous()
    unscorable = torch.isnan(result).all(dim=1)
    if unscorable.any():
        i = int(unscorable.nonzero()[0, 0])
        logger.warning("%d of %d completions got None from every reward function (advantage 0), e.g. completion %d: "
                       "prompt %.200r, completion %.200r", int(unscorable.sum()), n, i, prompts[i], completions[i])
    return result
