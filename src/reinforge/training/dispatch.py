"""Choose the loop for a method from the method table (offline, online, or EBFT's strided loop)."""

from __future__ import annotations

from typing import Any

from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig


def train(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Run training for `cfg`; returns the run summary."""
    spec = method(cfg.rl)
    if spec.rewards == "feature_matching" and cfg.ebft.mode == "strided":
        from reinforge.training.strided import train_strided

        return train_strided(cfg)
    if spec.online:
        from reinforge.training.online import train_online

        return train_online(cfg)
    from reinforge.training.offline import train_offline

    return train_offline(cfg)
