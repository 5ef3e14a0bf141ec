"""What each training method needs: the loop asks this table, never matches method names itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodSpec:
    """Requirements of one `rl:` method.

    data: the record kind it trains on (paired chosen/rejected, unpaired labelled, prompt-only).
    needs_reference: whether reference log-probs enter the loss (False: no reference is loaded).
    online: whether completions are generated during training.
    """

    name: str
    data: Literal["paired", "unpaired", "prompt"]
    needs_reference: bool
    online: bool


METHODS: dict[str, MethodSpec] = {
    "dpo": MethodSpec("dpo", "paired", needs_reference=True, online=False),
    "ipo": MethodSpec("ipo", "paired", needs_reference=True, online=False),
    "kto": MethodSpec("kto", "unpaired", needs_reference=True, online=False),
    "orpo": MethodSpec("orpo", "paired", needs_reference=False, online=False),
    "simpo": MethodSpec("simpo", "paired", needs_reference=False, online=False),
    "grpo": MethodSpec("grpo", "prompt", needs_reference=True, online=True),
    "gdpo": MethodSpec("gdpo", "prompt", needs_reference=True, online=True),
    "ebft": MethodSpec("ebft", "prompt", needs_reference=False, online=True),
}


def method(name: str) -> MethodSpec:
    """The spec of method `name`. Raises KeyError listing valid names."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
