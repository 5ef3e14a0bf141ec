"""Helpers shared by conversational formats: role/key mapping of messages, field access."""

from __future__ import annotations

from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError

DEFAULT_ROLES = {
    "system": ["system", "developer"],  # developer: the OpenAI Responses / NeMo Gym name of the system role
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt", "model"],
    "tool": ["tool"],
}


def lookup(row: dict[str, Any], name: str) -> Any:
    """`row[name]`; a dotted name (`responses_create_params.input`) that is not a column itself walks nested
    mappings. None when absent."""
    if name in row or "." not in name:
        return row.get(name)
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def field(row: dict[str, Any], name: str, types: type | tuple[type, ...] | None = None) -> Any:
    """`row[name]` (a dotted name reads nested mappings, see `lookup`), checked for presence (non-None) and type.
    Raises RowError naming the field."""
    value = lookup(row, name)
    if value is None:
        raise RowError(name, "missing")
    if types is not None and not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise RowError(name, f"expected {want}, got {type(value).__name__}")
    return value


def role_map(ds: DatasetConfig) -> dict[str, str]:
    """Data role name → standard role, from `roles:` (standard → list of data names)."""
    roles = ds.roles or DEFAULT_ROLES
    out = {}
    for standard, names in roles.items():
        for name in names:
            out[name] = standard
    for standard in ("system", "user", "assistant", "tool"):
        out.setdefault(standard, standard)
    return out


def normalize_message(msg: Any, ds: DatasetConfig, field_name: str) -> dict[str, str]:
    """One data message → `{"role", "content"}` using `message_property_mappings` and `roles`."""
    if not isinstance(msg, dict):
        raise RowError(field_name, f"expected a message (mapping), got {type(msg).__name__}")
    props = {"role": "role", "content": "content"}
    props.update(ds.message_property_mappings or {})
    if props["role"] not in msg:
        raise RowError(field_name, f"message has no `{props['role']}` key (keys: {sorted(msg)})")
    if props["content"] not in msg:
        raise RowError(field_name, f"message has no `{props['content']}` key (keys: {sorted(msg)})")
    roles = role_map(ds)
    role = msg[props["role"]]
    if role not in roles:
        raise RowError(field_name, f"unknown role {role!r}; map it with `roles:` (known: {sorted(roles)})")
    content = msg[props["content"]]
    if not isinstance(content, str):
        raise RowError(field_name, f"message content must be a string, got {type(content).__name__}")
    return {"role": roles[role], "content": content}


def normalize_messages(value: Any, ds: DatasetConfig, field_name: str) -> list[dict[str, str]]:
    """A list of data messages → standard messages."""
    if not isinstance(value, list):
        raise RowError(field_name, f"expected a list of messages, got {type(value).__name__}")
    return [normalize_message(m, ds, field_name) for m in value]


def prompt_messages(value: Any, ds: DatasetConfig, field_name: str) -> list[dict[str, str]]:
    """A prompt conversation: a list of data messages, or a string (one user message, as Axolotl does)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    msgs = normalize_messages(value, ds, field_name)
    if not msgs:
        raise RowError(field_name, "empty conversation")
    return msgs


def response_messages(value: Any, ds: DatasetConfig, field_name: str) -> list[dict[str, str]]:
    """A chosen/rejected response given as a string, one message or a list → assistant message list."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [normalize_message(value, ds, field_name)]
    if isinstance(value, list) and value:
        return normalize_messages(value, ds, field_name)
    raise RowError(field_name, f"expected a string, a message or a non-empty list of messages, got {value!r:.80}")


def label_value(row: dict[str, Any], name: str) -> bool:
    """A KTO label: a bool (or the integers 0/1). Raises RowError naming the field otherwise."""
    value = field(row, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RowError(name, f"expected a bool (true = desirable completion), got {type(value).__name__} {value!r:.40}")
