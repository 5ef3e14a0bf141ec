"""Datasets without `type:`: TRL's standard/conversational layouts recognised from the first row."""

from __future__ import annotations

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator
from reinforge.data.errors import RowError
from reinforge.data.formats import detect
from reinforge.data.tokenize import TokenizeStats, tokenize_record

DS = DatasetConfig(path="x.jsonl")
U = {"role": "user", "content": "What color is the sky?"}
BLUE, GREEN = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}


@pytest.mark.parametrize("row, name, expected", [
    ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "standard preference (explicit prompt)",
     {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "standard preference (implicit prompt)",
     {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    ({"prompt": [U], "chosen": [BLUE], "rejected": [GREEN]}, "conversational preference (explicit prompt)",
     {"prompt": [U], "chosen": [BLUE], "rejected": [GREEN]}),
    ({"chosen": [U, BLUE], "rejected": [U, GREEN]}, "conversational preference (implicit prompt)",
     {"prompt": [U], "chosen": [BLUE], "rejected": [GREEN]}),
    # TRL's maybe_extract_prompt: a text prompt next to conversational responses is ignored
    ({"prompt": "ignored", "chosen": [U, BLUE], "rejected": [U, GREEN]}, "conversational preference (implicit prompt)",
     {"prompt": [U], "chosen": [BLUE], "rejected": [GREEN]}),
    ({"messages": [U], "chosen": BLUE, "rejected": GREEN}, "chat_template.default",
     {"prompt": [U], "chosen": [BLUE], "rejected": [GREEN]}),
])
def test_paired_layouts(row, name, expected):
    fmt = detect(row, "paired")
    assert fmt.name == name
    assert fmt.fn(row, DS) == expected


def test_implicit_prompt_matches_trl_extract_prompt():
    from trl.data_utils import extract_prompt

    for row in ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
                {"chosen": [U, BLUE], "rejected": [U, GREEN]}):
        assert detect(row, "paired").fn(row, DS) == extract_prompt(row)


def test_standard_record_tokenised_with_eos(tokenizer):
    row = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    out = tokenize_record(detect(row, "paired").fn(row, DS), "paired", tokenizer, 64, "truncate", "keep_end", TokenizeStats())
    batch = PairedCollator(tokenizer.pad_token_id)([out])
    assert tokenizer.decode(out["prompt_ids"]) == "The sky is"
    assert [tokenizer.decode(t[t != IGNORE].tolist()) for t in batch["targets"]] == [" blue.<|im_end|>", " green.<|im_end|>"]


@pytest.mark.parametrize("row, name, expected", [
    ({"prompt": "The sky is", "completion": " blue.", "label": True}, "standard unpaired preference",
     [{"prompt": "The sky is", "completion": " blue.", "label": True}]),
    ({"prompt": [U], "completion": [BLUE], "label": False}, "conversational unpaired preference",
     [{"prompt": [U], "completion": [BLUE], "label": False}]),
    ({"messages": [U, BLUE], "label": True}, "chat_template.default",
     [{"prompt": [U], "completion": [BLUE], "label": True}]),
    ({"prompt": [U], "chosen": [BLUE], "rejected": [GREEN]},
     "conversational preference (explicit prompt), unpaired into desirable/undesirable rows",
     [{"prompt": [U], "completion": [BLUE], "label": True}, {"prompt": [U], "completion": [GREEN], "label": False}]),
])
def test_unpaired_layouts(row, name, expected):
    fmt = detect(row, "unpaired")
    assert fmt.name == name
    out = fmt.fn(row, DS)
    assert (out if isinstance(out, list) else [out]) == expected


def test_prompt_only_keeps_columns():
    fmt = detect({"prompt": [U], "answer": "blue"}, "prompt")
    assert fmt.name == "conversational prompt-only"
    assert fmt.fn({"prompt": [U], "answer": "blue"}, DS) == {"prompt": [U], "answer": "blue"}
    assert detect({"prompt": "The sky is"}, "prompt").name == "standard prompt-only"


@pytest.mark.parametrize("row, kind", [({"question": "q", "answer": "a"}, "paired"),
                                       ({"text": "x"}, "unpaired"), ({"question": "q"}, "prompt")])
def test_unknown_layout_lists_the_accepted_ones(row, kind):
    with pytest.raises(ValueError) as err:
        detect(row, kind)
    msg = str(err.value)
    assert str(sorted(row)) in msg and "Set `type:`" in msg and '"prompt"' in msg


def test_identical_responses_are_an_error():
    row = {"chosen": "same", "rejected": "same"}
    with pytest.raises(RowError, match="identical"):
        detect(row, "paired").fn(row, DS)
