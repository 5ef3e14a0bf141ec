"""`passthrough`: canonical rows used as they are (validated)."""

from __future__ import annotations

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator
from reinforge.data.errors import RowError
from reinforge.data.formats import get_format
from reinforge.data.tokenize import TokenizeStats, tokenize_record

DS = DatasetConfig(path="x.jsonl", type="passthrough")
P = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_paired_text(tokenizer):
    row = {"prompt": P, "chosen": "4<|im_end|>", "rejected": "5<|im_end|>", "extra": 1}
    rec = get_format("passthrough", "paired").fn(row, DS)
    assert rec == {"prompt": P, "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}
    out = tokenize_record(rec, "paired", tokenizer, 512, "truncate", "keep_end", TokenizeStats())
    batch = PairedCollator(tokenizer.pad_token_id)([out])
    assert [tokenizer.decode(t[t != IGNORE].tolist()) for t in batch["targets"]] == ["4<|im_end|>", "5<|im_end|>"]
    assert tokenizer.decode(out["prompt_ids"]) == P


def test_paired_conversational():
    u, a, b = [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
    assert get_format("passthrough", "paired").fn({"prompt": u, "chosen": a, "rejected": b}, DS) == \
        {"prompt": u, "chosen": a, "rejected": b}


def test_unpaired_and_prompt_keep_what_they_should():
    rec = get_format("passthrough", "unpaired").fn({"prompt": P, "completion": "4", "label": False}, DS)
    assert rec == {"prompt": P, "completion": "4", "label": False}
    rec = get_format("passthrough", "prompt").fn({"prompt": "Q", "answer": "4"}, DS)
    assert rec == {"prompt": "Q", "answer": "4"}


@pytest.mark.parametrize("row, field", [
    ({"prompt": P, "chosen": "4"}, "rejected"),
    ({"prompt": P, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}, "chosen"),
    ({"prompt": 3, "chosen": "4", "rejected": "5"}, "prompt"),
    ({"prompt": P, "chosen": "", "rejected": "5"}, "chosen"),
])
def test_errors(row, field):
    with pytest.raises(RowError) as err:
        get_format("passthrough", "paired").fn(row, DS)
    assert err.value.field == field
