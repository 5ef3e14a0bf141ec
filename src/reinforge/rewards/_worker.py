"""Code that runs inside reward worker processes (spawned). Standard library + the reward modules only."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from reinforge.rewards.calls import RewardFunctionError, call_reward
from reinforge.rewards.loading import load_reward_func

_FUNCS: list[tuple[str, Any]] = []
_INIT_ERROR: str | None = None


def init_worker(entries: list[tuple], sys_path: list[str], ready: Any) -> None:
    """Pool initializer: restore the parent's sys.path, load the reward functions, report readiness.

    entries: per function ("spec", spec, search_dir, name) or ("callable", fn, name).
    """
    global _INIT_ERROR
    # Ctrl-C is the trainer's to handle (it checkpoints, then closes the pool); a worker must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = sys_path
    try:
        for entry in entries:
            if entry[0] == "spec":
                _, spec, search_dir, name = entry
                _FUNCS.append((name, load_reward_func(spec, search_dir).fn))
            else:
                _, fn, name = entry
                _FUNCS.append((name, fn))
    except Exception as err:  # noqa: BLE001 - reported to the parent on the first call
        _INIT_ERROR = f"{type(err).__name__}: {err}"
    ready.put(os.getpid())


def run_chunk(func_index: int, prompts: list, completions: list, completion_ids: list, columns: dict[str, list],
              offset: int, total: int) -> tuple[str, Any]:
    """Score one chunk with one function. Returns ("ok", floats) or ("error", message) or ("error", (message,
    the exception's repr or None)) when the function raised or returned a wrong value."""
    if _INIT_ERROR is not None:
        return "error", f"reward worker failed to load the reward functions: {_INIT_ERROR}"
    name, fn = _FUNCS[func_index]
    try:
        return "ok", call_reward(fn, name, prompts, completions, completion_ids, columns, offset, total)
    except RewardFunctionError as err:
        return "error", (str(err), err.exception)

