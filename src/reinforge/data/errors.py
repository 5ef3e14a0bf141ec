"""Errors about data that name the dataset, the row, the field and the expected format."""

from __future__ import annotations

import json
from typing import Any


class RowError(ValueError):
    """A problem with one field of one row, raised by a format function.

    The loader catches it and re-raises a `DataError` that adds the dataset and the row index.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"field `{field}`: {problem}")
        self.field = field
        self.problem = problem


class DataError(ValueError):
    """Bad input data: the message names the dataset, the row index (0-based), the field, the expected
    format with an example record of it, and optionally the columns the row has."""

    def __init__(self, dataset: str, row: int | None, field: str | None, problem: str,
                 format_name: str | None = None, example: dict[str, Any] | None = None,
                 columns: list[str] | None = None):
        where = f"{dataset}" + (f", row {row}" if row is not None else "") + (f", field `{field}`" if field else "")
        msg = f"{where}: {problem}"
        if columns is not None:
            msg += f" (the row's columns: {', '.join(map(str, columns))})"
        if format_name:
            msg += f"\n  expected format `{format_name}`"
        if example is not None:
            msg += ", a record like:\n    " + json.dumps(example, ensure_ascii=False)[:600]
        super().__init__(msg)
        self.dataset, self.row, self.field = dataset, row, field
