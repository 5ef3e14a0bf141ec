"""One reward-function call with TRL's calling convention, its output checks and its error report.

Standard library only: runs both in the training process and in reward worker processes.
"""

from __future__ import annotations

import math
import numbers
import traceback
from typing import Any, Callable

from reinforge.user_code import UserCodeError, describe_exception

TRUNCATE_CHARS = 300


class RewardFunctionError(UserCodeError):
    """A reward function raised, returned a wrong value, or timed out. The message names the
    function and, when one is to blame, the sample (prompt and completion, truncated) and the
    traceback; `what` is one line (`reward function m.fn raised ValueError('boom')`), `name` the
    function's configured name when the caller knows it, `exception` the exception's repr when it raised."""

    def __init__(self, message: str, *, name: str | None = None, exception: BaseException | str | None = None):
        super().__init__("reward function", name or "?", exception, message=message, detail=message)


def _short(value: Any, limit: int = TRUNCATE_CHARS) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _to_float(name: str, index: int, value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, numbers.Real):  # bool, int, float and numpy scalars
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a one-element tensor
        return float(value.item())
    raise RewardFunctionError(
        f"reward function {name!r} returned a {type(value).__name__} for completion {index} "
        f"({_short(value, 80)}); expected a float, an int or None"
    )


def check_output(name: str, output: Any, expected: int, offset: int = 0) -> list[float]:
    """Validate a reward function's return value: a sequence of `expected` numbers or None.

    Returns floats (None → NaN). Raises RewardFunctionError naming the function on a wrong type or
    length. `offset` is added to reported sample indices (for chunks of a larger batch).
    """
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__") or not hasattr(output, "__iter__"):
        raise RewardFunctionError(
            f"reward function {name!r} returned a {type(output).__name__}; expected a list with one reward "
            f"(float or None) per completion"
        )
    values = list(output)
    if len(values) != expected:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} rewards for {expected} completions; "
            f"it must return exactly one reward (float or None) per completion"
        )
    return [_to_float(name, offset + i, v) for i, v in enumerate(values)]


def _describe_sample(prompt: Any, completion: Any) -> str:
    return f"  prompt: {_short(prompt)}\n  completion: {_short(completion)}"


def call_reward(fn: Callable[..., Any], name: str, prompts: list, completions: list, completion_ids: list,
                columns: dict[str, list], offset: int = 0, total: int | None = None) -> list[float]:
    """Call `fn(prompts=..., completions=..., completion_ids=..., **columns)` on a batch and check
    its output.

    If it raises, it is called again on each sample alone to find the first one that raises, and a
    RewardFunctionError reports that sample (prompt + completion, truncated, index `offset + i` of
    `total`) with its traceback. If no single sample raises, the batch-level traceback is reported.

    Returns: one float per sample (None → NaN).
    """
    n = len(completions)
    total = n if total is None else total
    try:
        output = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as err:  # noqa: BLE001 - reported with full context below
        batch_tb, batch_err = traceback.format_exc(), describe_exception(err)
    else:
        return check_output(name, output, n, offset)
    for i in range(n):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], completion_ids=[completion_ids[i]],
               **{k: [v[i]] for k, v in columns.items()})
        except Exception as err:  # noqa: BLE001
            raise RewardFunctionError(
                f"reward function {name!r} raised on completion {offset + i} of {total}:\n"
                f"{_describe_sample(prompts[i], completions[i])}\n{traceback.format_exc()}", name=name, exception=err
            ) from None
    raise RewardFunctionError(
        f"reward function {name!r} raised on a batch of {n} completions (indices {offset}..{offset + n - 1} of "
        f"{total}), but on none of them alone; first sample of the batch:\n"
        f"{_describe_sample(prompts[0], completions[0]) if n else '  (empty batch)'}\n{batch_tb}",
        name=name, exception=batch_err)
