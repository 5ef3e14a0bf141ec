"""Load a `datasets[]` entry as a `datasets.Dataset`: local files, directories or Hub names."""

from __future__ import annotations

from pathlib import Path

import datasets

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import DataError

_EXT_TO_BUILDER = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_TYPE_TO_BUILDER = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}


def load_source(ds: DatasetConfig) -> datasets.Dataset:
    """Load the rows of one dataset entry.

    Local file → the builder for its extension (or `ds_type`); local directory → its files (or
    `data_files` inside it); anything else → `datasets.load_dataset(path, name, split=...)`, which
    works offline for cached Hub datasets.

    Raises:
        DataError: the source cannot be read or the split is empty.
    """
    path = Path(ds.path).expanduser()
    try:
        if path.exists():
            if path.is_dir():
                files = ds.data_files or sorted(
                    str(p) for p in path.iterdir() if p.suffix in _EXT_TO_BUILDER and p.is_file()
                )
                if isinstance(files, str):
                    files = [files]
                files = [str(path / f) if not Path(f).is_absolute() else f for f in files]
                if not files:
                    raise DataError(str(path), None, None, "directory holds no json/jsonl/parquet/csv/arrow files")
            else:
                files = [str(path)]
            builder = _TYPE_TO_BUILDER[ds.ds_type] if ds.ds_type else _EXT_TO_BUILDER.get(Path(files[0]).suffix)
            if builder is None:
                raise DataError(str(path), None, None, "cannot tell the file type; set `ds_type`")
            # The split of a local file is always "train"; slices ("train[:100]") still apply.
            split = ds.split if ds.split.startswith("train") else "train"
            data = datasets.load_dataset(builder, data_files=files, split=split)
        else:
            data = datasets.load_dataset(ds.path, ds.name, split=ds.split, data_files=ds.data_files)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; keep the message, add the source
        raise DataError(ds.path, None, None, f"cannot load: {type(exc).__name__}: {exc}") from exc
    if len(data) == 0:
        raise DataError(ds.path, None, None, f"split `{ds.split}` is empty")
    return data
