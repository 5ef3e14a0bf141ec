"""Dataset formats (`datasets[].type`): each turns a raw row into a canonical record.

Canonical records (what every format returns):
- paired (dpo, ipo, orpo, simpo): `{"prompt", "chosen", "rejected"}` — either all message lists
  (conversational: `prompt` is the history, `chosen`/`rejected` the assistant continuation) or all
  strings (text already templated; tokenised as is).
- unpaired (kto): `{"prompt", "completion", "label": bool}` — messages or strings as above.
- prompt (grpo, gdpo, ebft): `{"prompt", ...extra columns}`.

A format is registered with `register(name, kind, example)`; `get_format(type, kind)` looks it up.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Literal

from reinforge.config.schema import DatasetConfig

Kind = Literal["paired", "unpaired", "prompt"]
FormatFn = Callable[[dict[str, Any], DatasetConfig], dict[str, Any]]


@dataclass(frozen=True)
class Format:
    """A registered dataset format: the row function, the record kind it yields, an example input row."""

    name: str
    kind: Kind
    fn: FormatFn
    example: dict[str, Any]


_REGISTRY: dict[tuple[str, Kind], Format] = {}


def register(name: str, kind: Kind, example: dict[str, Any]) -> Callable[[FormatFn], FormatFn]:
    """Decorator: register `fn` as format `name` for records of `kind`."""

    def deco(fn: FormatFn) -> FormatFn:
        _REGISTRY[(name, kind)] = Format(name, kind, fn, example)
        return fn

    return deco


def available(kind: Kind) -> list[str]:
    """Names of the formats registered for `kind`."""
    _load_all()
    return sorted(name for name, k in _REGISTRY if k == kind)


def get_format(name: str, kind: Kind) -> Format:
    """The format `name` for records of `kind`.

    Raises:
        ValueError: unknown name, with the closest valid names for this kind.
    """
    _load_all()
    if (name, kind) in _REGISTRY:
        return _REGISTRY[(name, kind)]
    names = available(kind)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown dataset type `{name}` for {kind} data.{hint} Valid: {', '.join(names)}")


def _load_all() -> None:
    # Importing the modules registers their formats.
    from reinforge.data.formats import chat_template  # noqa: F401
