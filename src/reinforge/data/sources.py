"""Load a `datasets[]` entry as a `datasets.Dataset`: local files, directories or Hub names.

Local sources: a file (json, jsonl, parquet, csv, arrow; the type comes from `ds_type` or the
extension), a directory of such files (all of them, or `data_files` inside it), a directory
written by `Dataset.save_to_disk`, or, without `path`, the local `data_files` themselves (Axolotl's
`ds_type: json` + `data_files: [...]`, read like `datasets.load_dataset(ds_type, data_files=...)`).
A local file has a single split; `split: train[:500]`, `split: test[10:20]` or `split: train[:10%]`
keep their slice and apply it to that split.
Anything else is a Hugging Face dataset name: `datasets.load_dataset(path, name, split=...,
data_files=...)`, which works offline for cached datasets.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import datasets

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import DataError

_EXT_TO_BUILDER = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_TYPE_TO_BUILDER = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}


def source_name(ds: DatasetConfig) -> str:
    """How messages name a dataset entry: its path, plus `name` and a non-default split."""
    if ds.path is not None:
        out = ds.path
    else:
        out = ", ".join([ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files or []))
    if ds.name:
        out += f" ({ds.name})"
    if ds.split != "train":
        out += f" [{ds.split}]"
    return out


def local_files(ds: DatasetConfig) -> list[Path] | None:
    """The local files of a dataset entry (sorted), or None when `path` is not a local file or directory.

    Raises:
        DataError: a directory with no data files, or `data_files` that do not exist.
    """
    if ds.path is None:  # data_files alone: local files, relative to the working directory
        names = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files or [])
        files = [Path(f).expanduser() for f in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(source_name(ds), None, "data_files",
                            f"not found: {', '.join(missing)} (working directory: {Path.cwd()})")
        return files
    path = Path(ds.path).expanduser()
    if not path.exists():
        return None
    if path.is_file():
        return [path]
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if (path / "dataset_dict.json").is_file():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if ds.data_files:
        names = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files)
        files = [Path(f) if Path(f).is_absolute() else path / f for f in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(source_name(ds), None, "data_files", f"not found: {', '.join(missing)}")
        return files
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _EXT_TO_BUILDER)
    if not files:
        raise DataError(source_name(ds), None, None, "directory holds no json/jsonl/parquet/csv/arrow files")
    return files


def fingerprint(ds: DatasetConfig) -> str | None:
    """A hash of the contents of the entry's local files (None for Hub datasets).

    Raises:
        DataError: as `local_files`.
    """
    files = local_files(ds)
    if files is None:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _local_split(split: str) -> str:
    """A split expression for a single-split local source: the split name becomes `train`, the slice stays."""
    return re.sub(r"^[A-Za-z0-9_\-]+", "train", split.strip(), count=1)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in _EXT_TO_BUILDER


def load_source(ds: DatasetConfig) -> datasets.Dataset:
    """Load the rows of one dataset entry (see the module docstring).

    Raises:
        DataError: the source cannot be found or read, or the split is empty.
    """
    name = source_name(ds)
    path = Path(ds.path).expanduser() if ds.path is not None else None
    try:
        files = local_files(ds)
        if files is not None:
            split = _local_split(ds.split)
            if path is not None and path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
                data = datasets.load_from_disk(str(path))
                if isinstance(data, datasets.DatasetDict):
                    base = re.match(r"^[A-Za-z0-9_\-]+", ds.split.strip())
                    key = base.group(0) if base else "train"
                    if key not in data:
                        raise DataError(name, None, "split", f"no split `{key}`; splits: {', '.join(data)}")
                    data = data[key]
                slice_ = ds.split.strip()[len(re.match(r"^[A-Za-z0-9_\-]*", ds.split.strip()).group(0)):]
                if slice_:
                    data = _apply_slice(data, slice_, name)
            else:
                builder = _TYPE_TO_BUILDER[ds.ds_type] if ds.ds_type else _EXT_TO_BUILDER.get(files[0].suffix)
                if builder is None:
                    raise DataError(name, None, "ds_type", f"cannot tell the file type of {files[0].name}; set `ds_type`")
                data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
                slice_ = split[len("train"):]
                if slice_:
                    data = _apply_slice(data, slice_, name)
        elif _looks_local(ds.path):
            raise DataError(name, None, "path", f"file or directory not found: {path} (working directory: {Path.cwd()})")
        else:
            data = datasets.load_dataset(ds.path, ds.name, split=ds.split, data_files=ds.data_files)
    except DataError:
        raise
    except ValueError as exc:
        if "corresponds to no data" in str(exc):
            raise DataError(name, None, "split", f"split `{ds.split}` is empty") from exc
        raise DataError(name, None, None, f"cannot load: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # datasets raises many types; keep the message, add the source
        raise DataError(name, None, None, f"cannot load: {type(exc).__name__}: {exc}") from exc
    if isinstance(data, datasets.DatasetDict):
        raise DataError(name, None, "split", f"got several splits ({', '.join(data)}); choose one with `split:`")
    if len(data) == 0:
        raise DataError(name, None, "split", f"split `{ds.split}` is empty")
    return data


def _apply_slice(data: datasets.Dataset, slice_: str, name: str) -> datasets.Dataset:
    """`[a:b]` / `[:10%]` on an in-memory Dataset (the same syntax `load_dataset` accepts)."""
    m = re.fullmatch(r"\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\]", slice_)
    if not m:
        raise DataError(name, None, "split", f"cannot read the slice {slice_!r}; use e.g. train[:500] or train[10%:20%]")
    n = len(data)

    def pos(v: str | None, default: int) -> int:
        if v is None:
            return default
        return round(n * int(v[:-1]) / 100) if v.endswith("%") else int(v)

    a, b = pos(m.group(1), 0), pos(m.group(2), n)
    rows = range(*slice(a, b).indices(n))
    if len(rows) == 0:
        raise DataError(name, None, "split", f"the slice {slice_} of {n} rows is empty")
    return data.select(rows)
