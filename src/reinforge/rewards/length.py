"""Length reward: short, finished completions (or completions near a target length) score high."""

from __future__ import annotations

from typing import Any


def length_reward(completions: list[Any], completion_ids: list[list[int]],
                  completion_truncated: list[bool] | None = None,
                  max_completion_length: int | list[int] | None = None,
                  target_length: list[int | None] | None = None, **kwargs: Any) -> list[float]:
    """Reward by completion length n = len(completion_ids[i]) (tokens).

    - A truncated completion (it reached max_completion_length without an end-of-sequence token)
      scores 0.0.
    - Target mode, for rows whose dataset column `target_length` T is set: max(0, 1 − |n − T| / T)
      (1.0 at exactly T tokens, 0.0 at 0 or 2T tokens and beyond).
    - Otherwise, short mode: 1 − n / L with L = max_completion_length, so an EOS-terminated
      completion scores more the shorter it is (clamped to [0, 1]).

    Args:
        completions: N completions (unused except for their count).
        completion_ids: N lists of generated token ids.
        completion_truncated: N booleans, True when the completion ended without EOS; the GRPO
            training loop passes it to every reward function (required).
        max_completion_length: L (an int, or one per row); the training loop passes it; required
            for rows in short mode.
        target_length: optional dataset column of per-row target lengths (tokens, > 0) or None.
    Returns:
        N floats in [0, 1].
    Raises:
        ValueError: a required argument is missing or a target length is not positive.
    """
    n = len(completion_ids)
    if completion_truncated is None:
        raise ValueError("length_reward needs completion_truncated (one bool per completion), "
                         "which the GRPO training loop passes to reward functions")
    rewards = []
    for i in range(n):
        length = len(completion_ids[i])
        if completion_truncated[i]:
            rewards.append(0.0)
            continue
        target = target_length[i] if target_length is not None else None
        if target is not None:
            if target <= 0:
                raise ValueError(f"length_reward: target_length must be > 0; row {i} has {target!r}")
            rewards.append(max(0.0, 1.0 - abs(length - target) / target))
            continue
        limit = max_completion_length[i] if isinstance(max_completion_length, (list, tuple)) else max_completion_length
        if limit is None or limit <= 0:
            raise ValueError("length_reward needs max_completion_length (> 0) for rows without target_length; "
                             "the GRPO training loop passes it to reward functions")
        rewards.append(min(1.0, max(0.0, 1.0 - length / limit)))
    return rewards
