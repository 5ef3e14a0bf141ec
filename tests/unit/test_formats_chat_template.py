"""`chat_template.*` formats: exact records and the tokens each one trains on."""

from __future__ import annotations

import json

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, UnpairedCollator
from reinforge.data.errors import RowError
from reinforge.data.formats import get_format
from reinforge.data.tokenize import TokenizeStats, tokenize_record
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "data"

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def ds(**kw) -> DatasetConfig:
    return DatasetConfig(path="test.jsonl", **kw)


def trained_text(tokenizer, tokenized: dict, name: str) -> str:
    """The text of the tokens that carry a loss target, read back from the collated batch."""
    batch = UnpairedCollator(tokenizer.pad_token_id)([{**tokenized, "completion_ids": tokenized[f"{name}_ids"]}])
    targets = batch["targets"][0]
    return tokenizer.decode(targets[targets != IGNORE].tolist())


def test_kto_chat_template_default_record_and_mask(tokenizer):
    row = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], "label": True}
    rec = get_format("chat_template.default", "unpaired").fn(row, ds(type="chat_template.default"))
    assert rec == {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                   "completion": [{"role": "assistant", "content": "4"}], "label": True}
    out = tokenize_record(rec, "unpaired", tokenizer, 512, "truncate", "keep_end", TokenizeStats())
    assert tokenizer.decode(out["prompt_ids"]) == SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert trained_text(tokenizer, out, "completion") == "4<|im_end|>\n"
    assert out["label"] is True


def test_kto_chat_template_default_multi_turn_and_label_false(tokenizer):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "label": False}
    rec = get_format("chat_template.default", "unpaired").fn(row, ds())
    assert [m["content"] for m in rec["prompt"]] == ["a", "b", "c"]
    assert rec["completion"] == [{"role": "assistant", "content": "d"}]
    assert rec["label"] is False


def test_kto_chat_template_default_on_shipped_demo():
    rows = json.loads((DATA_DIR / "kto_en_demo.json").read_text())
    fn = get_format("chat_template.default", "unpaired").fn
    recs = [fn(r, ds()) for r in rows]
    assert len(recs) == 300
    assert sum(r["label"] for r in recs) == 150
    assert all(r["completion"][0]["role"] == "assistant" and r["prompt"][-1]["role"] == "user" for r in recs)


@pytest.mark.parametrize("row, field, words", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "label", "missing"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": "yes"}, "label", "expected a bool"),
    ({"messages": [{"role": "user", "content": "a"}], "label": True}, "messages", "at least"),
    ({"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "label": True}, "messages", "must end with"),
])
def test_kto_chat_template_default_errors(row, field, words):
    with pytest.raises(RowError) as err:
        get_format("chat_template.default", "unpaired").fn(row, ds())
    assert err.value.field == field and words in str(err.value)
