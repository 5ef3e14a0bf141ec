"""What each training method needs: the loop asks this table, never matches method names itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodSpec:
    """Requirements of one `rl:` method.

    data: the record kind it trains on (paired chosen/rejected, unpaired labelled, prompt-only).
    needs_reference: whether reference log-probs enter the loss (False: no reference is loaded).
    online: whether completions are generated during training (the online loop trains it).
    objective: the online objective the loop builds (`reinforge.training.online_objective.ONLINE_OBJECTIVES`),
        None for offline methods.
    packing: whether packing / prefix sharing apply to its batches.
    aggregation: the multi-reward aggregation the method implies (None: `trl.multi_objective_aggregation`).
    implemented: False for a method the config names but reinforge cannot train yet (a config error, never
        another method's loop); note: why, shown in that error.
    rewards: where an online method's rewards come from: the user's `trl.reward_funcs` ("functions") or
        EBFT's feature matching against each row's ground truth ("feature_matching", no reward functions).
    """

    name: str
    data: Literal["paired", "unpaired", "prompt"]
    needs_reference: bool
    online: bool
    objective: str | None = None
    packing: bool = True
    aggregation: str | None = None
    implemented: bool = True
    note: str = ""
    rewards: Literal["functions", "feature_matching"] = "functions"


METHODS: dict[str, MethodSpec] = {
    "dpo": MethodSpec("dpo", "paired", needs_reference=True, online=False),
    "ipo": MethodSpec("ipo", "paired", needs_reference=True, online=False),
    "kto": MethodSpec("kto", "unpaired", needs_reference=True, online=False),
    "orpo": MethodSpec("orpo", "paired", needs_reference=False, online=False),
    "simpo": MethodSpec("simpo", "paired", needs_reference=False, online=False),
    "grpo": MethodSpec("grpo", "prompt", needs_reference=True, online=True, objective="policy_gradient"),
    "gdpo": MethodSpec("gdpo", "prompt", needs_reference=True, online=True, objective="policy_gradient",
                       aggregation="normalize_then_sum"),
    "ebft": MethodSpec("ebft", "prompt", needs_reference=False, online=True, objective="policy_gradient",
                       rewards="feature_matching"),
}


def method(name: str) -> MethodSpec:
    """The spec of method `name`. Raises KeyError listing valid names."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def packing_methods() -> tuple[str, ...]:
    """Names of the methods whose batches packing and prefix sharing apply to."""
    return tuple(name for name, spec in METHODS.items() if spec.packing)
