"""`type: module.fn` dataset transforms (Axolotl's convention, used for GRPO/EBFT and custom data).

`fn(cfg, dataset_idx=i)` returns `transform_fn` or `(transform_fn, map_kwargs)`;
`transform_fn(example, tokenizer=None)` returns a dict that updates the row (as `datasets.map`
does): the columns named in `map_kwargs["remove_columns"]` or the dataset's `remove_columns`
(`"__all__"`: every original column) are removed first. Supported map kwargs: `remove_columns`,
`fn_kwargs`, `batched` (the function gets a batch of one row, columns as lists, and may return several rows);
`desc`, `num_proc`, `load_from_cache_file`, `keep_in_memory` change nothing here and are ignored; any other key is
an error.

The module is looked up, in order: a file in the working directory (`module.py`, `pkg/module.py`
for `pkg.module.fn`, or a package directory), reinforge's own strategies
(`reinforge.data.formats.strategies`), then any importable module.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import Format, Kind
from reinforge.user_code import UserCodeError

log = logging.getLogger(__name__)

STRATEGIES = "reinforge.data.formats.strategies"
_IGNORED_MAP_KWARGS = {"desc", "num_proc", "load_from_cache_file", "keep_in_memory"}


class TransformError(RowError):
    """A `module.fn` transform raised on a row: `what` is one line (`dataset transform m.fn raised
    ValueError('boom')`), `detail` the traceback (shown with --debug); `field` is the missing column of a
    KeyError, else "transform"."""

    def __init__(self, type_name: str, exc: BaseException, field: str = "transform"):
        user = UserCodeError("dataset transform", type_name, exc)
        super().__init__(field, user.what)
        self.what, self.detail = user.what, user.detail


def _from_cwd(module_path: str) -> ModuleType | None:
    base = Path.cwd().joinpath(*module_path.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            existing = sys.modules.get(module_path)
            if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == file.resolve():
                return existing
            spec = importlib.util.spec_from_file_location(module_path, file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_path] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_path, None)
                raise
            return module
    return None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def find_module(module_path: str) -> ModuleType | None:
    """The module for `module_path` (working directory, then reinforge's strategies, then importable), or None."""
    module = _from_cwd(module_path)
    if module is not None:
        return module
    for name in (f"{STRATEGIES}.{module_path}", module_path):
        if _importable(name):
            return importlib.import_module(name)
    return None


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def load_transform_format(type_name: str, kind: Kind, cfg: Any, dataset_idx: int, tokenizer: Any,
                          ds: DatasetConfig) -> Format | None:
    """A `Format` running the transform named `type_name` (`module.fn`), or None when no such module exists.

    Raises:
        ValueError: the module has no `fn`, `fn` returns something else than a transform, or the map
            kwargs are not supported.
    """
    module_path, fn_name = type_name.rsplit(".", 1)
    module = find_module(module_path)
    if module is None:
        return None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise ValueError(f"dataset type `{type_name}`: module {module.__file__} has no function `{fn_name}`")
    result = factory(cfg, dataset_idx=dataset_idx)
    map_kwargs: dict[str, Any] = {}
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result, map_kwargs = result
    if not callable(result):
        raise ValueError(f"dataset type `{type_name}`: `{fn_name}(cfg)` must return transform_fn or "
                         f"(transform_fn, map_kwargs), got {type(result).__name__}")
    unknown = set(map_kwargs) - {"remove_columns", "fn_kwargs", "batched"} - _IGNORED_MAP_KWARGS
    if unknown:
        raise ValueError(f"dataset type `{type_name}`: map kwargs {sorted(unknown)} are not supported "
                         "(supported: remove_columns, fn_kwargs, batched)")
    batched = bool(map_kwargs.get("batched"))
    transform_fn = result
    extra = dict(map_kwargs.get("fn_kwargs") or {})
    for name in ("tokenizer", "processing_class"):
        if _accepts(transform_fn, name):
            extra[name] = tokenizer
    remove = map_kwargs.get("remove_columns") or []
    remove = [remove] if isinstance(remove, str) else list(remove)
    ds_remove = ds.remove_columns
    drop_all = ds_remove == "__all__" or remove == ["__all__"]
    if isinstance(ds_remove, str) and ds_remove != "__all__":
        remove.append(ds_remove)
    elif isinstance(ds_remove, list):
        remove.extend(ds_remove)

    def fn(row: dict[str, Any], _ds: DatasetConfig) -> dict[str, Any] | list[dict[str, Any]]:
        try:
            out = transform_fn({k: [v] for k, v in row.items()} if batched else dict(row), **extra)
        except KeyError as exc:  # most often a column the row does not have: name it as the field
            raise TransformError(type_name, exc, str(exc.args[0]) if exc.args else "?") from None
        except Exception as exc:  # the user's code: one line names it and the exception (with the row: DataError)
            raise TransformError(type_name, exc) from None
        if not isinstance(out, dict):
            raise RowError("transform", f"`{type_name}` must return a dict, got {type(out).__name__}")
        base = {} if drop_all else {k: v for k, v in row.items() if k not in remove}
        if not batched:
            return {**base, **out}
        lengths = {len(v) for v in out.values()}  # a batch of one row may become several rows
        if len(lengths) > 1 or not all(isinstance(v, list) for v in out.values()):
            raise RowError("transform", f"`{type_name}` (batched) must return equal-length lists per column")
        n = lengths.pop() if lengths else 0
        if not drop_all and n != 1:
            raise RowError("transform", f"`{type_name}` (batched) made {n} rows from one: it must drop the "
                                        f"original columns (remove_columns: __all__)")
        return [{**base, **{k: v[i] for k, v in out.items()}} for i in range(n)]

    example = getattr(module, "EXAMPLE", None)
    source = getattr(module, "__file__", None)
    log.debug("dataset type %s → %s", type_name, source)
    return Format(type_name, kind, fn, example if isinstance(example, dict) else {}, source=source)
