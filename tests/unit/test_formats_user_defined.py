"""`type:` as a mapping (Axolotl's user_defined.default) for DPO and KTO: exact text and trained tokens."""

from __future__ import annotations

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator, UnpairedCollator
from reinforge.data.errors import RowError
from reinforge.data.formats import resolve
from reinforge.data.formats.user_defined import check_config
from reinforge.data.tokenize import TokenizeStats, tokenize_record


def trained(tokenizer, out: dict, kind: str) -> list[str]:
    batch = (PairedCollator if kind == "paired" else UnpairedCollator)(tokenizer.pad_token_id)([out])
    return [tokenizer.decode(t[t != IGNORE].tolist()) for t in batch["targets"][: 2 if kind == "paired" else 1]]


DPO_TYPE = {"field_prompt": "question", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
            "prompt_format": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
            "chosen_format": "{chosen}<|im_end|>", "rejected_format": "{rejected}<|im_end|>"}


def test_dpo_user_defined_documented_record(tokenizer):
    ds = DatasetConfig(path="x.jsonl", type=DPO_TYPE)
    fmt = resolve(ds, "paired")
    rec = fmt.fn({"sys": "Be brief.", "question": "What is 2+2?", "good": "4", "bad": "5"}, ds)
    assert rec == {"prompt": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                             "<|im_start|>assistant\n", "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}
    out = tokenize_record(rec, "paired", tokenizer, 512, "truncate", "keep_end", TokenizeStats())
    assert tokenizer.decode(out["prompt_ids"]) == rec["prompt"]
    assert trained(tokenizer, out, "paired") == ["4<|im_end|>", "5<|im_end|>"]


def test_dpo_user_defined_defaults_are_the_plain_fields():
    ds = DatasetConfig(path="x.jsonl", type={})
    rec = resolve(ds, "paired").fn({"prompt": "Q", "chosen": "A", "rejected": "B", "system": "S"}, ds)
    assert rec == {"prompt": "Q", "chosen": "A", "rejected": "B"}


def test_missing_system_formats_as_empty_and_other_columns_are_placeholders():
    ds = DatasetConfig(path="x.jsonl", type={"prompt_format": "[{system}] {prompt} ({topic})"})
    rec = resolve(ds, "paired").fn({"prompt": "Q", "chosen": "A", "rejected": "B", "topic": "math"}, ds)
    assert rec["prompt"] == "[] Q (math)"


def test_kto_user_defined_documented_record(tokenizer):
    ds = DatasetConfig(path="x.jsonl", type={"field_completion": "answer", "field_label": "ok",
                                             "prompt_format": "User: {prompt}\nAssistant:", "completion_format": " {completion}"})
    rec = resolve(ds, "unpaired").fn({"prompt": "What is 2+2?", "answer": "4", "ok": True}, ds)
    assert rec == {"prompt": "User: What is 2+2?\nAssistant:", "completion": " 4", "label": True}
    out = tokenize_record(rec, "unpaired", tokenizer, 512, "truncate", "keep_end", st := TokenizeStats())
    assert trained(tokenizer, out, "unpaired") == [" 4<|im_end|>"]  # TRL appends EOS to text completions
    assert st.eos_appended == 1


def test_string_type_user_defined_uses_dataset_fields():
    ds = DatasetConfig(path="x.jsonl", type="user_defined.default", field_prompt="q")
    assert resolve(ds, "paired").fn({"q": "Q", "chosen": "A", "rejected": "B"}, ds)["prompt"] == "Q"


@pytest.mark.parametrize("type_, kind, words", [
    ({"field_completion": "c"}, "paired", "not a user_defined key"),
    ({"prompt_format": 3}, "paired", "must be a string"),
    ({"prompt_format": "{prompt"}, "paired", "not a valid format string"),
])
def test_bad_type_mapping(type_, kind, words):
    with pytest.raises(ValueError, match=words):
        check_config(DatasetConfig(path="x.jsonl", type=type_), kind)


@pytest.mark.parametrize("row, field", [
    ({"chosen": "A", "rejected": "B"}, "prompt"),
    ({"prompt": 1, "chosen": "A", "rejected": "B"}, "prompt"),
    ({"prompt": "Q", "chosen": "A", "rejected": "B", "system": 5}, "system"),
])
def test_row_errors(row, field):
    ds = DatasetConfig(path="x.jsonl", type={})
    with pytest.raises(RowError) as err:
        resolve(ds, "paired").fn(row, ds)
    assert err.value.field == field


def test_unknown_placeholder_names_it():
    ds = DatasetConfig(path="x.jsonl", type={"prompt_format": "{prompt} {context}"})
    with pytest.raises(RowError) as err:
        resolve(ds, "paired").fn({"prompt": "Q", "chosen": "A", "rejected": "B"}, ds)
    assert err.value.field == "context" and "prompt_format" in str(err.value)
