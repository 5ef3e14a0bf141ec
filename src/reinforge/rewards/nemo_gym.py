"""The NeMo Gym rewards: pass through what NeMo Gym answered for each completion.

The rollout source of a NeMo Gym run (`reinforge.nemo_gym.source`) asks NeMo Gym once per completion — a resource
server's `/verify` (single-turn) or an agent's `/run` (multi-turn) — and hands the answers to the reward functions
as the column `nemo_gym_reward` (NaN for a sample NeMo Gym masked or could not score; that sample is also out of the
loss). These two functions return that column, so the NeMo Gym reward is logged under its own name and weighted
with `trl.reward_weights` like any other. Outside a NeMo Gym run (`nemo_gym_enabled: false`) the column is absent
and they raise.

Axolotl's names `axolotl.integrations.nemo_gym.rewards.reward_nemo_gym_verify` / `reward_env` are aliases of these
(`reinforge.rewards.loading.ALIASES`). Standard library only (reward worker processes import it).
"""

from __future__ import annotations

import math
from typing import Any


def _passthrough(name: str, completions: list, nemo_gym_reward: list | None) -> list[float | None]:
    if nemo_gym_reward is None:
        raise ValueError(f"{name} returns the reward NeMo Gym gave each completion, and this run has none: set "
                         f"nemo_gym_enabled: true (with nemo_gym_datasets) so that rollouts are scored by NeMo Gym")
    out: list[float | None] = []
    for value in nemo_gym_reward:
        out.append(None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value))
    return out


def reward_nemo_gym_verify(completions: list, nemo_gym_reward: list | None = None, **kwargs: Any) -> list[float | None]:
    """Single-turn: the `reward` of the row's resource server `/verify` for each completion (None when masked)."""
    return _passthrough("reward_nemo_gym_verify", completions, nemo_gym_reward)


def reward_env(completions: list, nemo_gym_reward: list | None = None, **kwargs: Any) -> list[float | None]:
    """Multi-turn: the episode `reward` of the agent's `/run` for each completion (None when the episode failed)."""
    return _passthrough("reward_env", completions, nemo_gym_reward)
