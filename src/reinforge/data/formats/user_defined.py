"""`type:` given as a mapping (Axolotl's `user_defined.default`): field names and Python format strings.

DPO keys: field_prompt, field_system, field_chosen, field_rejected, prompt_format, chosen_format,
rejected_format. KTO keys: field_prompt, field_system, field_completion, field_label, prompt_format,
completion_format. Format strings use `{prompt}`, `{system}`, `{chosen}`, `{rejected}`,
`{completion}` (the values of the configured fields) and any column of the row by its name. A
missing or empty system is formatted as "". The result is text (tokenised as is; the tokenizer's
EOS is appended to responses that do not end with it, as TRL does).
"""

from __future__ import annotations

import string
from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import Kind, register
from reinforge.data.formats.messages import field, label_value

PAIRED_KEYS = {"field_prompt": "prompt", "field_system": "system", "field_chosen": "chosen", "field_rejected": "rejected",
               "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}
UNPAIRED_KEYS = {"field_prompt": "prompt", "field_system": "system", "field_completion": "completion",
                 "field_label": "label", "prompt_format": "{prompt}", "completion_format": "{completion}"}


def settings(ds: DatasetConfig, kind: Kind) -> dict[str, str]:
    """The effective settings: defaults, then dataset-level `field_*` keys, then the `type:` mapping.

    Raises:
        ValueError: an unknown key or a non-string value in the `type:` mapping.
    """
    defaults = PAIRED_KEYS if kind == "paired" else UNPAIRED_KEYS
    out = dict(defaults)
    for key in defaults:
        value = getattr(ds, key, None) if key.startswith("field_") else None
        if value:
            out[key] = value
    given = ds.type if isinstance(ds.type, dict) else {}
    for key, value in given.items():
        if key not in defaults:
            raise ValueError(f"`type.{key}` is not a user_defined key for {kind} data; valid: {', '.join(defaults)}")
        if not isinstance(value, str):
            raise ValueError(f"`type.{key}` must be a string, got {type(value).__name__}")
        if value:
            out[key] = value
    for key in defaults:
        if key.endswith("_format"):
            try:
                list(string.Formatter().parse(out[key]))
            except ValueError as exc:
                raise ValueError(f"`type.{key}` is not a valid format string: {exc}") from None
    return out


def check_config(ds: DatasetConfig, kind: Kind) -> None:
    """Validate the `type:` mapping once, before any row is read (raises ValueError)."""
    settings(ds, kind)


def _fill(template: str, key: str, values: dict[str, Any]) -> str:
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise RowError(exc.args[0], f"used by `{key}` ({template!r}) but not a column of the row") from None
    except (IndexError, ValueError) as exc:
        raise RowError(key, f"cannot format {template!r}: {exc}") from None


def _values(row: dict[str, Any], s: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    values = {k: v for k, v in row.items() if isinstance(k, str)}
    for name in names:
        values[name] = field(row, s[f"field_{name}"], str)
    system = row.get(s["field_system"])
    if system is not None and not isinstance(system, str):
        raise RowError(s["field_system"], f"expected text, got {type(system).__name__}")
    values["system"] = system or ""
    return values


@register("user_defined", "paired", example={"system": "You are a careful assistant.", "prompt": "What is 2+2?",
                                              "chosen": "4", "rejected": "5"})
def paired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """DPO rows from configured fields and format strings (see the module docstring)."""
    s = settings(ds, "paired")
    values = _values(row, s, ("prompt", "chosen", "rejected"))
    return {"prompt": _fill(s["prompt_format"], "prompt_format", values),
            "chosen": _fill(s["chosen_format"], "chosen_format", values),
            "rejected": _fill(s["rejected_format"], "rejected_format", values)}


@register("user_defined", "unpaired", example={"system": "You are a careful assistant.", "prompt": "What is 2+2?",
                                                "completion": "4", "label": True})
def unpaired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """KTO rows from configured fields and format strings (see the module docstring)."""
    s = settings(ds, "unpaired")
    values = _values(row, s, ("prompt", "completion"))
    return {"prompt": _fill(s["prompt_format"], "prompt_format", values),
            "completion": _fill(s["completion_format"], "completion_format", values),
            "label": label_value(row, s["field_label"])}


paired.check_config = check_config  # type: ignore[attr-defined]
unpaired.check_config = check_config  # type: ignore[attr-defined]
