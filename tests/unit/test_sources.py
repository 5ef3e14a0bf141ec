"""Data sources: local files of each type, directories, saved datasets, split slices, empty and missing sources."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import DataError
from reinforge.data.sources import fingerprint, load_source

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]


def write(path: Path, kind: str, rows=ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        ds = datasets.Dataset.from_list(rows)
        {"parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False)}[kind](str(path))
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv"])
def test_local_file_types(tmp_path, kind):
    p = write(tmp_path / f"d.{kind}", kind)
    data = load_source(DatasetConfig(path=str(p)))
    assert data.to_list() == ROWS


def test_arrow_file_and_ds_type(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert load_source(DatasetConfig(path=str(arrow))).to_list() == ROWS
    # a file without a known extension needs ds_type
    odd = write(tmp_path / "rows.data", "jsonl")
    with pytest.raises(DataError, match="set `ds_type`"):
        load_source(DatasetConfig(path=str(odd)))
    assert len(load_source(DatasetConfig(path=str(odd), ds_type="json"))) == 10


def test_directory_of_files_and_data_files(tmp_path):
    write(tmp_path / "dir" / "a.jsonl", "jsonl", ROWS[:4])
    write(tmp_path / "dir" / "b.jsonl", "jsonl", ROWS[4:])
    assert load_source(DatasetConfig(path=str(tmp_path / "dir"))).to_list() == ROWS
    only_b = load_source(DatasetConfig(path=str(tmp_path / "dir"), data_files="b.jsonl"))
    assert only_b.to_list() == ROWS[4:]
    with pytest.raises(DataError, match="not found"):
        load_source(DatasetConfig(path=str(tmp_path / "dir"), data_files=["c.jsonl"]))


def test_saved_dataset_directory_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_source(DatasetConfig(path=str(tmp_path / "one"), split="train[:3]")).to_list() == ROWS[:3]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]),
                          "test": datasets.Dataset.from_list(ROWS[6:])}).save_to_disk(str(tmp_path / "dd"))
    assert load_source(DatasetConfig(path=str(tmp_path / "dd"), split="test")).to_list() == ROWS[6:]
    with pytest.raises(DataError, match="no split `dev`"):
        load_source(DatasetConfig(path=str(tmp_path / "dd"), split="dev"))


@pytest.mark.parametrize("split, expected", [("train[:3]", ROWS[:3]), ("train[2:4]", ROWS[2:4]),
                                             ("test[-2:]", ROWS[-2:]), ("train[:50%]", ROWS[:5]), ("validation", ROWS)])
def test_split_slices_on_local_files(tmp_path, split, expected):
    p = write(tmp_path / "d.jsonl", "jsonl")
    assert load_source(DatasetConfig(path=str(p), split=split)).to_list() == expected


def test_empty_split_and_missing_file(tmp_path):
    p = write(tmp_path / "d.jsonl", "jsonl")
    with pytest.raises(DataError) as err:
        load_source(DatasetConfig(path=str(p), split="train[5:5]"))
    assert str(p) in str(err.value) and "empty" in str(err.value) and err.value.field == "split"
    with pytest.raises(DataError) as err:
        load_source(DatasetConfig(path="data/missing.jsonl"))
    assert "file or directory not found" in str(err.value) and err.value.field == "path"


def test_hub_name_that_is_not_cached_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load"):
        load_source(DatasetConfig(path="someone/surely-not-a-cached-dataset-xyz"))


def test_fingerprint_follows_contents(tmp_path):
    p = write(tmp_path / "d.jsonl", "jsonl")
    ds = DatasetConfig(path=str(p))
    before = fingerprint(ds)
    assert fingerprint(ds) == before
    write(p, "jsonl", ROWS[:9])
    assert fingerprint(ds) != before
    assert fingerprint(DatasetConfig(path="org/hub-name")) is None


def test_hub_name_passes_name_split_and_data_files(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, split=None, data_files=None):
        seen.update(path=path, name=name, split=split, data_files=data_files)
        return datasets.Dataset.from_list(ROWS[:5])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_source(DatasetConfig(path="openai/gsm8k", name="main", split="train[:5]"))
    assert len(data) == 5
    assert seen == {"path": "openai/gsm8k", "name": "main", "split": "train[:5]", "data_files": None}
