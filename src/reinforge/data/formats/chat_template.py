"""`chat_template.*` formats: conversations rendered later with the tokenizer's (or configured) chat template.

Every function here returns message lists; the chat template is applied at tokenisation.
"""

from __future__ import annotations

from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import register
from reinforge.data.formats.messages import field, label_value, normalize_messages, response_messages


def _check_assistant(name: str, msgs: list[dict[str, str]]) -> None:
    if msgs[-1]["role"] != "assistant":
        raise RowError(name, f"the response must be an assistant message, got role {msgs[-1]['role']!r}")


@register(
    "chat_template.default",
    "paired",
    example={
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": {"role": "assistant", "content": "4"},
        "rejected": {"role": "assistant", "content": "5"},
    },
)
def default_paired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """Axolotl `chat_template.default` for DPO: `field_messages` (default `messages`) is the prompt
    conversation; `field_chosen`/`field_rejected` (default `chosen`/`rejected`) are the responses,
    each a message, a list of messages (its last message is the response) or a string.
    """
    fm = ds.field_messages or "messages"
    fc = ds.field_chosen or "chosen"
    fr = ds.field_rejected or "rejected"
    prompt = normalize_messages(field(row, fm), ds, fm)
    if not prompt:
        raise RowError(fm, "empty conversation")
    chosen = response_messages(field(row, fc), ds, fc)[-1:]
    rejected = response_messages(field(row, fr), ds, fr)[-1:]
    _check_assistant(fc, chosen)
    _check_assistant(fr, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@register(
    "chat_template.default",
    "unpaired",
    example={
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "label": True,
    },
)
def default_unpaired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """`chat_template.default` for KTO (reinforge's own; Axolotl has no KTO chat_template strategy).

    `field_messages` (default `messages`) is a whole conversation that ends with an assistant
    message: that last message is the completion, everything before it the prompt.
    `field_label` (default `label`) says whether the completion is desirable (bool, or 0/1).
    """
    fm = ds.field_messages or "messages"
    fl = ds.field_label or "label"
    msgs = normalize_messages(field(row, fm), ds, fm)
    if len(msgs) < 2:
        raise RowError(fm, f"needs at least a prompt message and the assistant completion, got {len(msgs)} message(s)")
    if msgs[-1]["role"] != "assistant":
        raise RowError(fm, f"the conversation must end with the assistant completion, ends with role {msgs[-1]['role']!r}")
    return {"prompt": msgs[:-1], "completion": msgs[-1:], "label": label_value(row, fl)}
