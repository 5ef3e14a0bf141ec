"""`chat_template.*` formats: exact records and the tokens each one trains on (SmolLM2's chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator, UnpairedCollator
from reinforge.data.errors import RowError
from reinforge.data.formats import get_format
from reinforge.data.tokenize import TokenizeStats, tokenize_record

DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "data"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
GEN = "<|im_start|>assistant\n"
U = {"role": "user", "content": "What is 2+2?"}
A4, A5 = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}


def ds(**kw) -> DatasetConfig:
    return DatasetConfig(path="test.jsonl", **kw)


def trained(tokenizer, out: dict, kind: str) -> list[str]:
    """Decoded loss-target tokens of each sequence of the collated row (chosen, rejected | completion)."""
    if kind == "paired":
        batch, n = PairedCollator(tokenizer.pad_token_id)([out]), 2
    else:
        batch, n = UnpairedCollator(tokenizer.pad_token_id)([out]), 1
    texts = []
    for r in range(n):
        t = batch["targets"][r]
        texts.append(tokenizer.decode(t[t != IGNORE].tolist()))
    return texts


def tok(tokenizer, rec, kind):
    return tokenize_record(rec, kind, tokenizer, 512, "truncate", "keep_end", TokenizeStats())


# ---- DPO chat_template.default -----------------------------------------------------------------

def test_dpo_default_documented_record(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, U], "chosen": A4, "rejected": A5}
    rec = get_format("chat_template.default", "paired").fn(row, ds())
    assert rec == {"prompt": row["messages"], "chosen": [A4], "rejected": [A5]}
    out = tok(tokenizer, rec, "paired")
    assert tokenizer.decode(out["prompt_ids"]) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + GEN
    # Axolotl's text is "4<|im_end|>" (it strips the template's trailing newline); with the conversational
    # record the newline the template writes after <|im_end|> is part of the completion, as in TRL.
    assert trained(tokenizer, out, "paired") == ["4<|im_end|>\n", "5<|im_end|>\n"]


def test_dpo_default_mappings_roles_and_response_shapes(tokenizer):
    row = {"conversations": [{"from": "human", "value": "What is 2+2?"}],
           "good": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "4"}],  # a list: its last message
           "bad": "5"}  # a string: an assistant message
    d = ds(field_messages="conversations", field_chosen="good", field_rejected="bad",
           message_property_mappings={"role": "from", "content": "value"}, roles={"user": ["human"], "assistant": ["gpt"]})
    rec = get_format("chat_template.default", "paired").fn(row, d)
    assert rec == {"prompt": [U], "chosen": [A4], "rejected": [A5]}
    out = tok(tokenizer, rec, "paired")
    assert tokenizer.decode(out["prompt_ids"]) == SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + GEN


def test_dpo_default_string_prompt_is_one_user_message():
    rec = get_format("chat_template.default", "paired").fn({"messages": "What is 2+2?", "chosen": "4", "rejected": "5"}, ds())
    assert rec == {"prompt": [U], "chosen": [A4], "rejected": [A5]}


def test_dpo_default_on_shipped_demo(tokenizer):
    d = ds(field_messages="conversations", message_property_mappings={"role": "from", "content": "value"},
           roles={"user": ["human"], "assistant": ["gpt"]})
    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())
    fn = get_format("chat_template.default", "paired").fn
    recs = [fn(r, d) for r in rows]
    assert len(recs) == 300 and all(r["chosen"][0]["role"] == "assistant" for r in recs)
    assert recs[0]["chosen"][0]["content"] == rows[0]["chosen"]["value"]


@pytest.mark.parametrize("row, field, words", [
    ({"chosen": A4, "rejected": A5}, "messages", "missing"),
    ({"messages": [U], "chosen": {"role": "user", "content": "4"}, "rejected": A5}, "chosen", "assistant"),
    ({"messages": [{"role": "narrator", "content": "x"}], "chosen": A4, "rejected": A5}, "messages", "unknown role"),
    ({"messages": [{"role": "user", "text": "x"}], "chosen": A4, "rejected": A5}, "messages", "no `content` key"),
    ({"messages": [U], "chosen": 4, "rejected": A5}, "chosen", "expected a string"),
    ({"messages": [], "chosen": A4, "rejected": A5}, "messages", "empty"),
])
def test_dpo_default_errors(row, field, words):
    with pytest.raises(RowError) as err:
        get_format("chat_template.default", "paired").fn(row, ds())
    assert err.value.field == field and words in str(err.value)


# ---- DPO chat_template.argilla_chat ------------------------------------------------------------

def test_dpo_argilla_chat_multi_turn(tokenizer):
    hist = [U, A4, {"role": "user", "content": "And 3+3?"}]
    row = {"chosen": hist + [{"role": "assistant", "content": "6"}], "rejected": hist + [{"role": "assistant", "content": "7"}]}
    rec = get_format("chat_template.argilla_chat", "paired").fn(row, ds())
    assert rec == {"prompt": hist, "chosen": [{"role": "assistant", "content": "6"}],
                   "rejected": [{"role": "assistant", "content": "7"}]}
    out = tok(tokenizer, rec, "paired")
    assert tokenizer.decode(out["prompt_ids"]) == (SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                                   "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n" + GEN)
    assert trained(tokenizer, out, "paired") == ["6<|im_end|>\n", "7<|im_end|>\n"]


def test_dpo_argilla_chat_reports_differing_history():
    row = {"chosen": [U, A4], "rejected": [{"role": "user", "content": "other"}, A5]}
    rec = get_format("chat_template.argilla_chat", "paired").fn(row, ds())
    assert rec["prompt"] == [U] and "differs" in rec["_note"]


# ---- ORPO chat_template.argilla ----------------------------------------------------------------

def test_orpo_argilla_documented_record(tokenizer):
    row = {"system": "Be brief.", "prompt": "What is 2+2?", "chosen": [U, A4], "rejected": [U, A5]}
    rec = get_format("chat_template.argilla", "paired").fn(row, ds(type="chat_template.argilla"))
    assert rec == {"prompt": [{"role": "system", "content": "Be brief."}, U], "chosen": [A4], "rejected": [A5]}
    out = tok(tokenizer, rec, "paired")
    # Axolotl: prompt = template(system, user, generation prompt); chosen = template(... + assistant)[len(prompt):]
    assert tokenizer.decode(out["prompt_ids"]) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + GEN
    assert trained(tokenizer, out, "paired") == ["4<|im_end|>\n", "5<|im_end|>\n"]


def test_orpo_argilla_without_system_and_prompt():
    rec = get_format("chat_template.argilla", "paired").fn({"chosen": [U, A4], "rejected": [U, A5]}, ds())
    assert rec == {"prompt": [U], "chosen": [A4], "rejected": [A5]}


def test_orpo_argilla_prompt_replaces_the_last_user_turn():
    row = {"prompt": "Q2", "chosen": [U, A4, {"role": "user", "content": "q2"}, A5],
           "rejected": [U, A4, {"role": "user", "content": "q2"}, A4]}
    rec = get_format("chat_template.argilla", "paired").fn(row, ds())
    assert rec["prompt"] == [U, A4, {"role": "user", "content": "Q2"}]


# ---- KTO chat_template.default -----------------------------------------------------------------

def test_kto_chat_template_default_record_and_mask(tokenizer):
    row = {"messages": [U, A4], "label": True}
    rec = get_format("chat_template.default", "unpaired").fn(row, ds(type="chat_template.default"))
    assert rec == {"prompt": [U], "completion": [A4], "label": True}
    out = tok(tokenizer, rec, "unpaired")
    assert tokenizer.decode(out["prompt_ids"]) == SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + GEN
    assert trained(tokenizer, out, "unpaired") == ["4<|im_end|>\n"]
    assert out["label"] is True


def test_kto_chat_template_default_multi_turn_label_false_and_int_label():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "label": 0}
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
    ({"messages": [U, A4]}, "label", "missing"),
    ({"messages": [U, A4], "label": "yes"}, "label", "expected a bool"),
    ({"messages": [U, A4], "label": 2}, "label", "expected a bool"),
    ({"messages": [U], "label": True}, "messages", "at least"),
    ({"messages": [A4, U], "label": True}, "messages", "must end with"),
])
def test_kto_chat_template_default_errors(row, field, words):
    with pytest.raises(RowError) as err:
        get_format("chat_template.default", "unpaired").fn(row, ds())
    assert err.value.field == field and words in str(err.value)
