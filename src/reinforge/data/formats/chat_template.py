"""`chat_template.*` formats: conversations rendered with the tokenizer's (or configured) chat template."""

from __future__ import annotations

from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import register
from reinforge.data.formats.messages import field, normalize_messages, response_messages


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
    for name, msgs in ((fc, chosen), (fr, rejected)):
        if msgs[0]["role"] != "assistant":
            raise RowError(name, f"the response must be an assistant message, got role {msgs[0]['role']!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
