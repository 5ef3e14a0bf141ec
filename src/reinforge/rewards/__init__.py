"""Reward functions for GRPO/GDPO: loading `module.fn` strings, scoring, and built-ins.

Built-ins (short names for `trl.reward_funcs`): `accuracy` (reinforge.rewards.math.accuracy),
`format_reward` (reinforge.rewards.format.format_reward), `length_reward`
(reinforge.rewards.length.length_reward). This package imports no torch at import time, so reward
worker processes start quickly; `score` imports it when called.
"""

from reinforge.rewards.calls import RewardFunctionError
from reinforge.rewards.loading import BUILTINS, RewardFunc, RewardLoadError, load_reward_func, load_reward_funcs
from reinforge.rewards.scoring import RewardPool, format_completions, is_conversational_prompt, score

__all__ = [
    "BUILTINS",
    "RewardFunc",
    "RewardFunctionError",
    "RewardLoadError",
    "RewardPool",
    "format_completions",
    "is_conversational_prompt",
    "load_reward_func",
    "load_reward_funcs",
    "score",
]
