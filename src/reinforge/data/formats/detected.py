"""Formats recognised from the first row when a dataset has no `type:` (TRL's dataset layouts).

Standard (text) and conversational (role/content message lists) layouts, with an explicit `prompt`
or an implicit one (the common beginning of `chosen` and `rejected`, split as TRL's
`extract_prompt` does: messages up to the first difference; text up to the first differing
character, moving a separating space into the responses).
"""

from __future__ import annotations

from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import Format, Kind, get_format
from reinforge.data.formats.messages import field, label_value, normalize_messages

_U = {"role": "user", "content": "What color is the sky?"}
_A_BLUE = {"role": "assistant", "content": "It is blue."}
_A_GREEN = {"role": "assistant", "content": "It is green."}
EXAMPLES = {
    "standard preference (explicit prompt)": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "standard preference (implicit prompt)": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "conversational preference (explicit prompt)": {"prompt": [_U], "chosen": [_A_BLUE], "rejected": [_A_GREEN]},
    "conversational preference (implicit prompt)": {"chosen": [_U, _A_BLUE], "rejected": [_U, _A_GREEN]},
    "standard unpaired preference": {"prompt": "The sky is", "completion": " blue.", "label": True},
    "conversational unpaired preference": {"prompt": [_U], "completion": [_A_BLUE], "label": True},
    "standard prompt-only": {"prompt": "The sky is"},
    "conversational prompt-only": {"prompt": [_U]},
}


def _is_conv(value: Any) -> bool:
    """TRL's test: a list whose first element is a mapping with a `role` key."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _text(row: dict[str, Any], name: str) -> str:
    return field(row, name, str)


def _conv(row: dict[str, Any], name: str, ds: DatasetConfig) -> list[dict[str, str]]:
    msgs = normalize_messages(field(row, name, list), ds, name)
    if not msgs:
        raise RowError(name, "empty message list")
    return msgs


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from two texts sharing their beginning (TRL's rule: the prompt ends
    at the first differing character; a space just before it moves to the responses)."""
    n = min(len(chosen), len(rejected))
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    if i == n:
        raise RowError("chosen", "chosen and rejected are identical, or one is the beginning of the other")
    if i > 0 and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def split_implicit_messages(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) from two conversations sharing their first messages."""
    n = min(len(chosen), len(rejected))
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    if i == 0:
        raise RowError("chosen", "chosen and rejected share no first message, so there is no prompt")
    if i == n:
        raise RowError("chosen", "chosen and rejected are identical, or one is the beginning of the other")
    return chosen[:i], chosen[i:], rejected[i:]


def _paired_fn(name: str):
    def fn(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
        if name == "standard preference (explicit prompt)":
            return {"prompt": _text(row, "prompt"), "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}
        if name == "standard preference (implicit prompt)":
            p, c, r = split_implicit_text(_text(row, "chosen"), _text(row, "rejected"))
            return {"prompt": p, "chosen": c, "rejected": r}
        if name == "conversational preference (explicit prompt)":
            return {"prompt": _conv(row, "prompt", ds), "chosen": _conv(row, "chosen", ds), "rejected": _conv(row, "rejected", ds)}
        p, c, r = split_implicit_messages(_conv(row, "chosen", ds), _conv(row, "rejected", ds))
        return {"prompt": p, "chosen": c, "rejected": r}

    return fn


def _paired_layout(row: dict[str, Any]) -> str | None:
    if "chosen" not in row or "rejected" not in row:
        return None
    conv = _is_conv(row["chosen"])
    prompt = row.get("prompt")
    if prompt is not None and _is_conv(prompt) == conv:
        return f"{'conversational' if conv else 'standard'} preference (explicit prompt)"
    return f"{'conversational' if conv else 'standard'} preference (implicit prompt)"


def _unpair(paired_fn):
    def fn(row: dict[str, Any], ds: DatasetConfig) -> list[dict[str, Any]]:
        rec = paired_fn(row, ds)
        return [{"prompt": rec["prompt"], "completion": rec["chosen"], "label": True},
                {"prompt": rec["prompt"], "completion": rec["rejected"], "label": False}]

    return fn


def _unpaired_fn(conv: bool):
    def fn(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
        get = (lambda n: _conv(row, n, ds)) if conv else (lambda n: _text(row, n))
        return {"prompt": get("prompt"), "completion": get("completion"), "label": label_value(row, "label")}

    return fn


def describe_expected(kind: Kind) -> str:
    """The layouts accepted without `type:` for `kind`, one per line with an example."""
    import json

    keys = {"paired": [k for k in EXAMPLES if " preference (" in k],
            "unpaired": [k for k in EXAMPLES if "unpaired" in k],
            "prompt": [k for k in EXAMPLES if "prompt-only" in k]}[kind]
    lines = [f"  - {k}: {json.dumps(EXAMPLES[k])}" for k in keys]
    if kind != "prompt":
        lines.append("  - or `messages` + " + ("`chosen`/`rejected`" if kind == "paired" else "`label`")
                     + " (chat_template.default)")
    if kind == "unpaired":
        lines.append("  - or paired rows (prompt/chosen/rejected), each split into a desirable and an undesirable row")
    return "\n".join(lines)


def detect_format(row: dict[str, Any], kind: Kind) -> Format:
    """See `reinforge.data.formats.detect`. Raises ValueError when no layout matches."""
    if kind == "paired":
        if "messages" in row and "chosen" in row and "rejected" in row:
            return get_format("chat_template.default", "paired")
        name = _paired_layout(row)
        if name:
            return Format(name, "paired", _paired_fn(name), EXAMPLES[name])
    elif kind == "unpaired":
        if "completion" in row and "label" in row:
            conv = _is_conv(row["completion"])
            name = f"{'conversational' if conv else 'standard'} unpaired preference"
            return Format(name, "unpaired", _unpaired_fn(conv), EXAMPLES[name])
        if "messages" in row and "label" in row:
            return get_format("chat_template.default", "unpaired")
        name = _paired_layout(row)
        if name:
            return Format(f"{name}, unpaired into desirable/undesirable rows", "unpaired", _unpair(_paired_fn(name)),
                          EXAMPLES[name])
    else:
        if "prompt" in row:
            name = f"{'conversational' if _is_conv(row['prompt']) else 'standard'} prompt-only"
            return Format(name, "prompt", get_format("passthrough", "prompt").fn, EXAMPLES[name])
    raise ValueError(f"no `type:` given and the columns {sorted(row)} match no known layout. Set `type:` "
                     f"(see docs/datasets.md) or use one of these layouts:\n{describe_expected(kind)}")
