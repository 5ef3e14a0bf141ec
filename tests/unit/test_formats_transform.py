"""`type: module.fn` transforms (GRPO/EBFT and custom data) and the built-in GSM8K transform."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import resolve
from reinforge.data.formats.strategies.reinforge_gsm8k import EXAMPLE, SYSTEM_PROMPT, final_number
from reinforge.data.tokenize import TokenizeStats, tokenize_records

GSM8K = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k" / "train.jsonl"
SMOL_GEN = "<|im_start|>assistant\n"


def test_gsm8k_builtin(tokenizer):
    row = json.loads(GSM8K.read_text().splitlines()[0])
    ds = DatasetConfig(path=str(GSM8K), type="reinforge_gsm8k.transform")
    fmt = resolve(ds, "prompt", tokenizer=tokenizer)
    rec = fmt.fn(row, ds)
    shot = [{"role": "user", "content": EXAMPLE["question"]}, {"role": "assistant", "content": EXAMPLE["answer"]}]
    assert rec == {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, *shot, {"role": "user", "content": row["question"]}],
                   "answer": row["answer"]}
    assert "step by step" in SYSTEM_PROMPT and "#### <number>" in SYSTEM_PROMPT
    assert final_number(rec["answer"]) == "72" and final_number(EXAMPLE["answer"]) == "16"
    assert all(EXAMPLE["question"] != json.loads(line)["question"] for line in GSM8K.read_text().splitlines())
    out = tokenize_records([rec], "prompt", tokenizer, 512, "truncate", "keep_end", TokenizeStats())[0]
    assert tokenizer.decode(out["prompt_ids"]) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{EXAMPLE['question']}<|im_end|>\n"
        f"<|im_start|>assistant\n{EXAMPLE['answer']}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n" + SMOL_GEN)
    assert fmt.source.endswith("reinforge_gsm8k.py")


def test_gsm8k_missing_column_names_it(tokenizer):
    ds = DatasetConfig(path="x", type="reinforge_gsm8k.transform")
    with pytest.raises(RowError) as err:
        resolve(ds, "prompt").fn({"question": "q"}, ds)
    assert err.value.field == "answer"


def _write(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / name).write_text(textwrap.dedent(body))


def test_module_from_working_directory_with_tokenizer_and_remove_columns(tmp_path, monkeypatch, tokenizer):
    _write(tmp_path, "my_rewards_tf.py", """
        def oai_transform(cfg, *args, **kwargs):
            def transform_fn(example, tokenizer=None):
                assert tokenizer is not None
                return {"prompt": [{"role": "user", "content": example["question"]}],
                        "answer": example["answer"].split("####")[-1].strip()}
            return transform_fn, {"remove_columns": ["question"]}
        """)
    monkeypatch.chdir(tmp_path)
    ds = DatasetConfig(path="x", type="my_rewards_tf.oai_transform")
    fmt = resolve(ds, "prompt", tokenizer=tokenizer)
    rec = fmt.fn({"question": "1+1?", "answer": "it is #### 2", "id": 7}, ds)
    assert rec == {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2", "id": 7}
    assert Path(fmt.source).resolve() == (tmp_path / "my_rewards_tf.py").resolve()


def test_working_directory_wins_over_builtin(tmp_path, monkeypatch):
    _write(tmp_path, "reinforge_gsm8k.py", """
        def transform(cfg, **kw):
            return lambda ex: {"prompt": "local " + ex["question"]}
        """)
    monkeypatch.chdir(tmp_path)
    ds = DatasetConfig(path="x", type="reinforge_gsm8k.transform")
    assert resolve(ds, "prompt").fn({"question": "q", "answer": "#### 1"}, ds)["prompt"] == "local q"


def test_remove_columns_all_from_dataset_config(tmp_path, monkeypatch):
    _write(tmp_path, "tf_all.py", """
        def t(cfg, **kw):
            def fn(example):
                example["prompt"] = example["q"]
                return example
            return fn
        """)
    monkeypatch.chdir(tmp_path)
    ds = DatasetConfig(path="x", type="tf_all.t", remove_columns="__all__")
    assert resolve(ds, "prompt").fn({"q": "Q", "other": 1}, ds) == {"prompt": "Q", "q": "Q", "other": 1}
    # "__all__" removes the original columns; what the transform returns is kept (as datasets.map does)
    _write(tmp_path, "tf_all2.py", """
        def t(cfg, **kw):
            return lambda ex: {"prompt": ex["q"]}
        """)
    ds = DatasetConfig(path="x", type="tf_all2.t", remove_columns="__all__")
    assert resolve(ds, "prompt").fn({"q": "Q", "other": 1}, ds) == {"prompt": "Q"}


def test_unsupported_map_kwargs_and_missing_function(tmp_path, monkeypatch):
    _write(tmp_path, "tf_bad.py", """
        def batched(cfg, **kw):
            return (lambda ex: ex), {"batched": True, "with_rank": True}
        def not_a_transform(cfg, **kw):
            return 3
        """)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="with_rank"):
        resolve(DatasetConfig(path="x", type="tf_bad.batched"), "prompt")
    with pytest.raises(ValueError, match="must return transform_fn"):
        resolve(DatasetConfig(path="x", type="tf_bad.not_a_transform"), "prompt")
    with pytest.raises(ValueError, match="has no function `nope`"):
        resolve(DatasetConfig(path="x", type="tf_bad.nope"), "prompt")


def test_unknown_module_is_an_unknown_type():
    with pytest.raises(ValueError) as err:
        resolve(DatasetConfig(path="x", type="no_such_module_xyz.fn"), "prompt")
    assert "unknown dataset type `no_such_module_xyz.fn`" in str(err.value) and "passthrough" in str(err.value)


def test_transform_errors_become_row_errors(tmp_path, monkeypatch):
    _write(tmp_path, "tf_raise.py", """
        def t(cfg, **kw):
            def fn(ex):
                raise ZeroDivisionError("boom")
            return fn
        """)
    monkeypatch.chdir(tmp_path)
    ds = DatasetConfig(path="x", type="tf_raise.t")
    with pytest.raises(RowError, match=r"dataset transform tf_raise.t raised ZeroDivisionError\('boom'\)") as err:
        resolve(ds, "prompt").fn({"q": 1}, ds)
    assert 'raise ZeroDivisionError("boom")' in err.value.detail  # the traceback, for --debug
