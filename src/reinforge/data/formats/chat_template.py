"""`chat_template.*` formats: conversations rendered later with the tokenizer's (or configured) chat template.

Every function here returns message lists; the chat template is applied at tokenisation (prompt
with the generation prompt, the response as what the template adds after it, as TRL does).
"""

from __future__ import annotations

from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import register
from reinforge.data.formats.messages import field, label_value, normalize_messages, prompt_messages, response_messages

_Q = {"role": "user", "content": "What is 2+2?"}


def _check_assistant(name: str, msgs: list[dict[str, str]]) -> None:
    if msgs[-1]["role"] != "assistant":
        raise RowError(name, f"the response must be an assistant message, got role {msgs[-1]['role']!r}")


@register(
    "chat_template.default",
    "paired",
    example={
        "messages": [_Q],
        "chosen": {"role": "assistant", "content": "4"},
        "rejected": {"role": "assistant", "content": "5"},
    },
)
def default_paired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """Axolotl `chat_template.default` for DPO: `field_messages` (default `messages`) is the prompt
    conversation (or a string: one user message); `field_chosen`/`field_rejected` (default
    `chosen`/`rejected`) are the responses, each a message, a list of messages (its last message is
    the response) or a string. `message_property_mappings` and `roles` map the data's keys and roles.
    """
    fm = ds.field_messages or "messages"
    fc = ds.field_chosen or "chosen"
    fr = ds.field_rejected or "rejected"
    prompt = prompt_messages(field(row, fm), ds, fm)
    chosen = response_messages(field(row, fc), ds, fc)[-1:]
    rejected = response_messages(field(row, fr), ds, fr)[-1:]
    _check_assistant(fc, chosen)
    _check_assistant(fr, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _history_and_responses(row: dict[str, Any], ds: DatasetConfig, fc: str, fr: str) -> dict[str, Any]:
    chosen = normalize_messages(field(row, fc, list), ds, fc)
    rejected = normalize_messages(field(row, fr, list), ds, fr)
    for name, msgs in ((fc, chosen), (fr, rejected)):
        if len(msgs) < 2:
            raise RowError(name, f"expected a conversation ending with the assistant response, got {len(msgs)} message(s)")
        _check_assistant(name, msgs)
    out: dict[str, Any] = {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    if chosen[:-1] != rejected[:-1]:
        out["_note"] = "rejected's history differs from chosen's; chosen's was used"
    return out


@register(
    "chat_template.argilla_chat",
    "paired",
    example={
        "chosen": [_Q, {"role": "assistant", "content": "4"}],
        "rejected": [_Q, {"role": "assistant", "content": "5"}],
    },
)
def argilla_chat(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """Multi-turn `chosen`/`rejected` conversations (`field_chosen`/`field_rejected`): the prompt is
    chosen's history (`chosen[:-1]`), the responses the last message of each (as Axolotl). Rows whose
    rejected history differs from chosen's are counted and reported."""
    return _history_and_responses(row, ds, ds.field_chosen or "chosen", ds.field_rejected or "rejected")


@register(
    "chat_template.argilla",
    "paired",
    example={
        "system": "You are a careful assistant.",
        "prompt": "What is 2+2?",
        "chosen": [_Q, {"role": "assistant", "content": "4"}],
        "rejected": [_Q, {"role": "assistant", "content": "5"}],
    },
)
def argilla(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """Axolotl's ORPO `chat_template.argilla`: `chosen`/`rejected` conversations, an optional
    `system` (prepended as a system message) and an optional `prompt` that replaces the content of
    the last user message before the response (Axolotl replaces every user turn with it; the two
    agree on single-turn rows)."""
    out = _history_and_responses(row, ds, "chosen", "rejected")
    system = row.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise RowError("system", f"expected text, got {type(system).__name__}")
        out["prompt"] = [{"role": "system", "content": system}] + [m for m in out["prompt"] if m["role"] != "system"]
    prompt = row.get("prompt")
    if prompt not in (None, ""):
        if not isinstance(prompt, str):
            raise RowError("prompt", f"expected text, got {type(prompt).__name__}")
        users = [i for i, m in enumerate(out["prompt"]) if m["role"] == "user"]
        if not users:
            raise RowError("chosen", "the conversation has no user message")
        out["prompt"][users[-1]] = {"role": "user", "content": prompt}
    return out


@register(
    "chat_template.default",
    "unpaired",
    example={"messages": [_Q, {"role": "assistant", "content": "4"}], "label": True},
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


@register(
    "chat_template.default",
    "prompt",
    example={"responses_create_params": {"input": [{"role": "developer", "content": "You are helpful."},
                                                   {"role": "user", "content": "What is 2+2?"}]}, "answer": "4"},
)
def default_prompt(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """`chat_template` for GRPO/GDPO prompts: `field_messages` (default `messages`; a dotted path such as
    `responses_create_params.input` reads a nested field, as Axolotl's NeMo Gym configs do) is the prompt
    conversation (or a string: one user message); every other column is kept for the reward functions (the nested
    field's parent too). A trailing assistant message is dropped (the policy writes that turn).
    """
    fm = ds.field_messages or "messages"
    msgs = prompt_messages(field(row, fm), ds, fm)
    out: dict[str, Any] = {k: v for k, v in row.items() if k != fm and k != "prompt"}
    if len(msgs) > 1 and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
        out["_note"] = "a trailing assistant message was dropped from the prompt"
    out["prompt"] = msgs
    return out
