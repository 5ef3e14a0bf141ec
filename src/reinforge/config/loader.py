"""YAML + `KEY=VALUE` overrides → a validated `ReinforgeConfig`, with errors a user can act on.

Errors raised: `ConfigError` whose message lists every problem, each with its dotted key; an unknown
key names the closest valid key (Axolotl drops unknown keys silently; reinforge never does).
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from reinforge.config.nemo_gym import rewrite_raw
from reinforge.config.schema import ReinforgeConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message lists every problem found."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["a.b=1", "lr=1e-5"]` into a nested dict; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: an item without `=`.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        value = _scalar(yaml.safe_load(raw)) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def _scalar(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` as a string; read number-like strings as numbers."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The BaseModel class inside an annotation (`M`, `M | None`, `list[M]`) and whether it is a list."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if origin in (list, tuple):
        for arg in typing.get_args(annotation):
            model, _ = _model_of(arg)
            if model is not None:
                return model, True
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, is_list = _model_of(arg)
            if model is not None:
                return model, is_list
    return None, False


def unknown_key_errors(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of `data` (recursively) that `model` does not define, each with a suggestion."""
    if not isinstance(data, dict):
        return []
    errors = []
    fields = model.model_fields
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
            errors.append(f"unknown key `{path}`{hint}")
            continue
        sub, is_list = _model_of(fields[key].annotation)
        if sub is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                errors += unknown_key_errors(item, sub, f"{path}[{i}].")
        else:
            errors += unknown_key_errors(value, sub, f"{path}.")
    return errors


def _format_validation(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"`{loc}`: {msg} (got {err.get('input')!r})" if loc else msg)
    return out


def build_config(data: dict[str, Any], source: str = "<config>") -> ReinforgeConfig:
    """Validate a raw mapping. Raises ConfigError listing unknown keys and invalid values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys to values")
    data = _apply_method_defaults(data)
    try:
        data = rewrite_raw(data)  # Axolotl's legacy dataset keys; nemo_gym_datasets[].max_samples
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    problems = unknown_key_errors(data, ReinforgeConfig)
    if not problems:
        try:
            return ReinforgeConfig.model_validate(data)
        except ValidationError as exc:
            problems = _format_validation(exc)
    raise ConfigError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def _apply_method_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Defaults that depend on `rl` (e.g. GDPO's normalize_then_sum) — applied before validation."""
    from reinforge.algorithms.registry import METHODS

    spec = METHODS.get(data.get("rl"))
    if spec is not None and spec.aggregation:
        trl = dict(data.get("trl") or {})
        if trl.get("multi_objective_aggregation", spec.aggregation) != spec.aggregation:
            raise ConfigError(f"rl: {spec.name} means trl.multi_objective_aggregation: {spec.aggregation}")
        trl["multi_objective_aggregation"] = spec.aggregation
        data = {**data, "trl": trl}
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ReinforgeConfig:
    """Read a YAML config, apply dotted `KEY=VALUE` overrides, validate.

    Raises:
        ConfigError: unreadable file, unknown keys (with the closest valid key), invalid values.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return build_config(raw, source=str(path))
