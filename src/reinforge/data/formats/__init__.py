"""Dataset formats (`datasets[].type`): each turns a raw row into a canonical record.

Canonical records (what every format returns):
- paired (dpo, ipo, orpo, simpo): `{"prompt", "chosen", "rejected"}` — either all message lists
  (conversational: `prompt` is the history, `chosen`/`rejected` the assistant continuation) or all
  strings (text already templated; tokenised as is).
- unpaired (kto): `{"prompt", "completion", "label": bool}` — messages or strings as above.
- prompt (grpo, gdpo, ebft): `{"prompt", ...extra columns}`.

A format is registered with `register(name, kind, example)`; `get_format(type, kind)` looks it up.
`resolve(type, kind, ...)` is what preparation uses: registered names, Axolotl's bare names
(`chatml` = `chatml.default`), a dict `type:` (user_defined) and `module.fn` transforms.
`detect(first_row, kind)` picks a format for a dataset without `type:` (TRL's standard and
conversational layouts). A format function may return one record or a list of records (KTO
unpairing of chosen/rejected rows), and may add a `"_note"` key (a short string) that preparation
counts and reports (e.g. "later turns ignored").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Literal

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError

Kind = Literal["paired", "unpaired", "prompt"]
FormatFn = Callable[[dict[str, Any], DatasetConfig], Any]
KINDS: tuple[Kind, ...] = ("paired", "unpaired", "prompt")
KIND_METHODS = {"paired": "DPO/IPO/ORPO/SimPO", "unpaired": "KTO", "prompt": "GRPO/GDPO/EBFT"}


@dataclass(frozen=True)
class Format:
    """A registered dataset format: the row function, the record kind it yields, an example input row.

    `source` names what the format depends on beyond the config (a module file for `module.fn`
    transforms); it feeds the prepared-data cache key.
    """

    name: str
    kind: Kind
    fn: FormatFn
    example: dict[str, Any]
    source: str | None = dc_field(default=None, compare=False)


_REGISTRY: dict[tuple[str, Kind], Format] = {}


def register(name: str, kind: Kind, example: dict[str, Any]) -> Callable[[FormatFn], FormatFn]:
    """Decorator: register `fn` as format `name` for records of `kind`."""

    def deco(fn: FormatFn) -> FormatFn:
        _REGISTRY[(name, kind)] = Format(name, kind, fn, example)
        return fn

    return deco


def alias(new: str, existing: str, kind: Kind) -> None:
    """Register `new` as another name of the already registered `existing` format."""
    fmt = _REGISTRY[(existing, kind)]
    _REGISTRY[(new, kind)] = Format(new, kind, fmt.fn, fmt.example)


def available(kind: Kind) -> list[str]:
    """Names of the formats registered for `kind`."""
    _load_all()
    return sorted(name for name, k in _REGISTRY if k == kind)


def get_format(name: str, kind: Kind) -> Format:
    """The registered format `name` for records of `kind` (bare Axolotl names: `chatml` = `chatml.default`).

    Raises:
        ValueError: unknown name, with the closest valid names for this kind.
    """
    _load_all()
    for candidate in (name, f"{name}.default"):
        if (candidate, kind) in _REGISTRY:
            return _REGISTRY[(candidate, kind)]
    raise ValueError(unknown_type_message(name, kind))


def closest(name: str, kind: Kind) -> list[str]:
    """Up to three registered names for `kind` close to `name`."""
    return difflib.get_close_matches(name, available(kind), n=3, cutoff=0.5)


def unknown_type_message(name: str, kind: Kind) -> str:
    """The message for an unknown `type:`: closest names, other kinds that know the name, valid names."""
    close = closest(name, kind)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    elsewhere = [k for k in KINDS if k != kind and ((name, k) in _REGISTRY or (f"{name}.default", k) in _REGISTRY)]
    if elsewhere:
        hint += f" (`{name}` is a format for {', '.join(KIND_METHODS[k] for k in elsewhere)} data.)"
    return (f"unknown dataset type `{name}` for {KIND_METHODS[kind]} ({kind}) data, and no module `{name.rsplit('.', 1)[0]}` "
            f"with a function `{name.rsplit('.', 1)[-1]}` was found in the working directory or reinforge's strategies.{hint}"
            f" Valid: {', '.join(available(kind))}")


def resolve(ds: DatasetConfig, kind: Kind, cfg: Any = None, dataset_idx: int = 0, tokenizer: Any = None) -> Format:
    """The format for a dataset entry with a `type:` (a name, a dict, or `module.fn`).

    Raises:
        ValueError: unknown type (message lists the closest names), a bad dict `type:`, or a
            `module.fn` whose function is missing or returns something other than a transform.
    """
    _load_all()
    t = ds.type
    if t is None:
        raise ValueError("resolve() needs a `type:`; use detect() for untyped datasets")
    if isinstance(t, dict):
        return get_format("user_defined", kind)
    for candidate in (t, f"{t}.default"):
        if (candidate, kind) in _REGISTRY:
            return _REGISTRY[(candidate, kind)]
    if t in ("user_defined", "user_defined.default"):
        return get_format("user_defined", kind)
    if "." in t:
        from reinforge.data.formats.transform import load_transform_format

        fmt = load_transform_format(t, kind, cfg, dataset_idx, tokenizer, ds)
        if fmt is not None:
            return fmt
    raise ValueError(unknown_type_message(t, kind))


# ---- canonical records -------------------------------------------------------------------------

def is_messages(value: Any) -> bool:
    """A non-empty list of `{"role": str, "content": str}` mappings."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value))


def check_record(record: Any, kind: Kind) -> dict[str, Any]:
    """Validate a canonical record of `kind` and return it.

    Raises:
        RowError: naming the first missing or mistyped field.
    """
    if not isinstance(record, dict):
        raise RowError("record", f"a format must produce a mapping, got {type(record).__name__}")
    names = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion"), "prompt": ("prompt",)}[kind]
    for name in names:
        if name not in record or record[name] is None:
            raise RowError(name, "missing")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        for name in names[1:]:
            if not isinstance(record[name], str):
                raise RowError(name, f"the prompt is text, so `{name}` must be text too, got {type(record[name]).__name__}")
            if not record[name]:
                raise RowError(name, "empty")
    elif is_messages(prompt):
        for name in names[1:]:
            if not is_messages(record[name]):
                raise RowError(name, "the prompt is a message list, so this must be a non-empty list of "
                                     f"{{role, content}} messages, got {_short(record[name])}")
    else:
        raise RowError("prompt", f"expected text or a non-empty list of {{role, content}} messages, got {_short(prompt)}")
    if kind == "unpaired":
        if "label" not in record or not isinstance(record["label"], bool):
            raise RowError("label", f"expected a bool, got {_short(record.get('label'))}")
    return record


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"


def detect(first_row: dict[str, Any], kind: Kind) -> Format:
    """The format of an untyped dataset, recognised from its first row (TRL's layouts).

    paired: prompt/chosen/rejected as text or message lists, or chosen/rejected only (implicit
    prompt: their common beginning), or `messages` + chosen/rejected (chat_template.default).
    unpaired: prompt/completion/label, `messages` + label (chat_template.default), or paired rows
    (each becomes a desirable and an undesirable row, as TRL's KTO trainer does).
    prompt: a `prompt` column (text or messages); other columns are kept.

    Raises:
        ValueError: the row matches none of these; the message lists them with examples.
    """
    from reinforge.data.formats.detected import detect_format

    return detect_format(first_row, kind)


def _load_all() -> None:
    # Importing the modules registers their formats.
    from reinforge.data.formats import chat_template, text_templates, user_defined, passthrough  # noqa: F401
