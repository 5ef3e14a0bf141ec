"""Resolve `trl.reward_funcs` strings (`module.fn` or a built-in short name) to callables.

Standard library only: reward worker processes import this module.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

#: Built-in reward functions by short name.
BUILTINS: dict[str, str] = {
    "accuracy": "reinforge.rewards.math.accuracy",
    "format_reward": "reinforge.rewards.format.format_reward",
    "length_reward": "reinforge.rewards.length.length_reward",
}

#: Other projects' names of reinforge's reward functions (Axolotl's NeMo Gym integration).
ALIASES: dict[str, str] = {
    "axolotl.integrations.nemo_gym.rewards.reward_nemo_gym_verify": "reinforge.rewards.nemo_gym.reward_nemo_gym_verify",
    "axolotl.integrations.nemo_gym.rewards.reward_env": "reinforge.rewards.nemo_gym.reward_env",
}

BUILTIN_PACKAGE = "reinforge.rewards"


class RewardLoadError(ValueError):
    """A `reward_funcs` entry could not be resolved; the message names the entry and the cause."""


@dataclass(frozen=True)
class RewardFunc:
    """One loaded reward function.

    spec: the configured string (None for a callable given directly).
    name: the metric name, the function's `__name__` as in TRL (`rewards/{name}/mean`).
    fn: the callable, `fn(prompts=..., completions=..., completion_ids=..., **columns) -> list`.
    search_dir: the directory put first on sys.path when it was loaded (worker processes repeat it).
    """

    spec: str | None
    name: str
    fn: Callable[..., Any]
    search_dir: str | None = None


def _module_missing(err: ModuleNotFoundError, module: str) -> bool:
    """True when `err` says `module` itself (or one of its parent packages) does not exist, as
    opposed to an import failing inside that module."""
    parts = module.split(".")
    return err.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _try_import(module: str, attr: str) -> tuple[Any | None, str]:
    """(object or None, reason when None). Errors raised while executing the module propagate as
    RewardLoadError with the traceback."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if _module_missing(err, module):
            return None, f"module {module!r} not found"
        raise RewardLoadError(f"importing module {module!r} failed:\n{traceback.format_exc()}") from err
    except Exception as err:  # noqa: BLE001 - any failure inside the user's module is reported whole
        raise RewardLoadError(f"importing module {module!r} failed:\n{traceback.format_exc()}") from err
    if not hasattr(mod, attr):
        return None, f"module {module!r} ({getattr(mod, '__file__', '?')}) has no function {attr!r}"
    return getattr(mod, attr), ""


def load_reward_func(spec: str, cwd: str | os.PathLike | None = None) -> RewardFunc:
    """Resolve one entry of `reward_funcs`.

    Order: `module.fn` imported with the working directory first on sys.path (so a `rewards.py`
    next to the config wins), then as an installed module (the rest of sys.path); then
    `reinforge.rewards.<module>.<fn>` (e.g. `math.accuracy`); a name without a dot is looked up in
    the built-ins (`BUILTINS`: accuracy, format_reward, length_reward). Names in `ALIASES` (Axolotl's NeMo Gym
    rewards) load reinforge's function of the same role.

    Args:
        spec: "module.fn", "package.module.fn" or a built-in short name.
        cwd: directory to put first on sys.path (default: os.getcwd()). It stays on sys.path, so
            that spawned worker processes (which copy sys.path) import the same module.
    Returns:
        RewardFunc.
    Raises:
        RewardLoadError: naming `spec` and what failed: module not found, no such function, not
            callable, or the module's import traceback.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardLoadError(f"reward function {spec!r}: expected a 'module.fn' string or a built-in name")
    spec = spec.strip()
    search_dir = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
    if not sys.path or sys.path[0] != search_dir:
        sys.path.insert(0, search_dir)
    candidates: list[tuple[str, str]] = []
    if spec in ALIASES:
        candidates.append(tuple(ALIASES[spec].rsplit(".", 1)))  # type: ignore[arg-type]
    elif "." in spec:
        module, attr = spec.rsplit(".", 1)
        candidates.append((module, attr))
        candidates.append((f"{BUILTIN_PACKAGE}.{module}", attr))
    elif spec in BUILTINS:
        candidates.append(tuple(BUILTINS[spec].rsplit(".", 1)))  # type: ignore[arg-type]
    else:
        raise RewardLoadError(
            f"reward function {spec!r}: not a 'module.fn' string and not a built-in ({', '.join(BUILTINS)})"
        )
    reasons = []
    for module, attr in candidates:
        obj, reason = _try_import(module, attr)
        if obj is None:
            reasons.append(reason)
            continue
        if not callable(obj):
            raise RewardLoadError(f"reward function {spec!r}: {module}.{attr} is not callable (it is a {type(obj).__name__})")
        return RewardFunc(spec=spec, name=getattr(obj, "__name__", attr), fn=obj, search_dir=search_dir)
    raise RewardLoadError(f"reward function {spec!r}: " + "; ".join(reasons) + f" (searched {search_dir} first)")


def load_reward_funcs(specs: list[str], cwd: str | os.PathLike | None = None) -> list[RewardFunc]:
    """`load_reward_func` for each entry of the config's `trl.reward_funcs`, in order.

    Raises RewardLoadError (naming the entry) for the first one that fails, or for an empty list.
    """
    if not specs:
        raise RewardLoadError("reward_funcs is empty: GRPO needs at least one reward function")
    return [load_reward_func(spec, cwd) for spec in specs]
