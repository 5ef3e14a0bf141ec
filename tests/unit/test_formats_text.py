"""Axolotl's text-templated formats (chatml.*, llama3.*, zephyr.nectar): exact text and trained tokens.

The expected strings are written out from what Axolotl's strategies of the same names produce for
the same record (src/axolotl/prompt_strategies/{dpo,kto}/{chatml,llama3}.py, dpo/zephyr.py).
"""

from __future__ import annotations

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator, UnpairedCollator
from reinforge.data.errors import RowError
from reinforge.data.formats import available, get_format
from reinforge.data.tokenize import TokenizeStats, tokenize_record

DS = DatasetConfig(path="rows.jsonl")
S, Q, C, R = "Be brief.", "What is 2+2?", "4", "5"

CHATML_SYS = f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
CHATML = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
L3_SYS = (f"<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
          f"{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
L3 = f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
PROMPT = {("chatml", True): CHATML_SYS, ("chatml", False): CHATML, ("llama3", True): L3_SYS, ("llama3", False): L3}
CONV_C = [{"role": "user", "content": Q}, {"role": "assistant", "content": C}]
CONV_R = [{"role": "user", "content": Q}, {"role": "assistant", "content": R}]

# (suffix, documented DPO record, has system)
DPO_ROWS = [
    ("default", {"system": S, "instruction": Q, "chosen_response": C, "rejected_response": R}, True),
    ("default", {"question": Q, "chosen": C, "rejected": R}, False),
    ("default", {"prompt": None, "input": Q, "chosen": None, "chosen_response": C, "rejected": R}, False),
    ("argilla", {"system": S, "instruction": Q, "chosen_response": C, "rejected_response": R}, True),
    ("argilla", {"system": "", "instruction": Q, "chosen_response": C, "rejected_response": R}, False),
    ("argilla_chat", {"chosen": CONV_C, "rejected": CONV_R}, False),
    ("icr", {"system": S, "input": Q, "chosen": C, "rejected": R}, True),
    ("icr", {"input": Q, "chosen": C, "rejected": R}, False),
    ("intel", {"system": S, "question": Q, "chosen": C, "rejected": R}, True),
    ("intel", {"system": None, "question": Q, "chosen": C, "rejected": R}, False),
    ("prompt_pairs", {"system": S, "prompt": Q, "chosen": C, "rejected": R}, True),
    ("prompt_pairs", {"prompt": Q, "chosen": C, "rejected": R}, False),
    ("ultra", {"system": S, "prompt": Q, "chosen": CONV_C, "rejected": CONV_R}, True),
    ("ultra", {"prompt": Q, "chosen": CONV_C, "rejected": CONV_R}, False),
]

KTO_ROWS = [
    ("argilla", {"system": S, "instruction": Q, "completion": C, "label": True}, True),
    ("argilla", {"instruction": Q, "completion": C, "label": False}, False),
    ("argilla_chat", {"completion": CONV_C, "label": True}, False),
    ("argilla_chat", {"chosen": [{"role": "user", "content": Q}], "completion": [{"role": "assistant", "content": C}],
                      "label": True}, False),
    ("intel", {"system": S, "question": Q, "completion": C, "label": True}, True),
    ("prompt_pairs", {"prompt": Q, "completion": C, "label": True}, False),
    ("ultra", {"system": S, "prompt": Q, "completion": C, "label": False}, True),
]


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


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
@pytest.mark.parametrize("suffix, row, has_system", DPO_ROWS)
def test_dpo_text_formats(tokenizer, markup, suffix, row, has_system):
    rec = get_format(f"{markup}.{suffix}", "paired").fn(dict(row), DS)
    rec.pop("_note", None)
    prompt = PROMPT[(markup, has_system)]
    assert rec == {"prompt": prompt, "chosen": C + END[markup], "rejected": R + END[markup]}
    out = tokenize_record(rec, "paired", tokenizer, 512, "truncate", "keep_end", stats := TokenizeStats())
    # SmolLM2's EOS is <|im_end|>: chatml responses already end with it; llama3 ones get it appended (as TRL).
    # SmolLM2 tokenises "\n\n" alone as one token but "\n\n4" as three: the llama3 prompt's final "\n\n"
    # merges across the boundary, so the completion starts at the divergence and the row is counted.
    eos, merged = ("", "") if markup == "chatml" else ("<|im_end|>", "\n\n")
    assert tokenizer.decode(out["prompt_ids"]) == prompt[: len(prompt) - len(merged)]
    assert trained(tokenizer, out, "paired") == [merged + C + END[markup] + eos, merged + R + END[markup] + eos]
    assert stats.eos_appended == (markup == "llama3")
    assert stats.boundary_merges == (markup == "llama3")


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
@pytest.mark.parametrize("suffix, row, has_system", KTO_ROWS)
def test_kto_text_formats(tokenizer, markup, suffix, row, has_system):
    rec = get_format(f"{markup}.{suffix}", "unpaired").fn(dict(row), DS)
    prompt = PROMPT[(markup, has_system)]
    assert rec == {"prompt": prompt, "completion": C + END[markup], "label": row["label"]}
    out = tokenize_record(rec, "unpaired", tokenizer, 512, "truncate", "keep_end", stats := TokenizeStats())
    eos, merged = ("", "") if markup == "chatml" else ("<|im_end|>", "\n\n")  # see test_dpo_text_formats
    assert tokenizer.decode(out["prompt_ids"]) == prompt[: len(prompt) - len(merged)]
    assert trained(tokenizer, out, "unpaired") == [merged + C + END[markup] + eos]
    assert stats.boundary_merges == (markup == "llama3")
    assert out["label"] is row["label"]


def test_every_axolotl_name_is_registered():
    paired, unpaired = set(available("paired")), set(available("unpaired"))
    for m in ("chatml", "llama3"):
        assert {f"{m}.{s}" for s in ("default", "argilla", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")} <= paired
        assert {f"{m}.{s}" for s in ("argilla", "argilla_chat", "intel", "prompt_pairs", "ultra")} <= unpaired
    assert "zephyr.nectar" in paired
    # Axolotl's bare names load `<name>.default`
    assert get_format("chatml", "paired").name == "chatml.default"


def test_argilla_chat_multi_turn_is_reported_not_silent():
    more = CONV_C + [{"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    rec = get_format("chatml.argilla_chat", "paired").fn({"chosen": more, "rejected": CONV_R}, DS)
    assert rec["_note"] == "turns after the first exchange ignored"
    assert rec["chosen"] == "4<|im_end|>"


@pytest.mark.parametrize("row, field, words", [
    ({"completion": [{"role": "user", "content": Q}, {"role": "user", "content": C}], "label": True}, "completion",
     "assistant completion"),
    ({"completion": [{"role": "human", "content": Q}, {"role": "assistant", "content": C}], "label": True}, "completion",
     "role 'human'"),
    ({"completion": [{"content": Q}, {"role": "assistant", "content": C}], "label": True}, "completion", "message 0"),
    ({"completion": [], "label": True}, "completion", "non-empty"),
    ({"completion": [{"role": "assistant", "content": C}], "label": True}, "chosen", "missing"),
])
def test_kto_argilla_chat_errors_name_the_field(row, field, words):
    with pytest.raises(RowError) as err:
        get_format("chatml.argilla_chat", "unpaired").fn(row, DS)
    assert err.value.field == field and words in str(err.value)


def test_argilla_chat_wrong_roles_rejected():
    with pytest.raises(RowError) as err:
        get_format("chatml.argilla_chat", "paired").fn({"chosen": list(reversed(CONV_C)), "rejected": CONV_R}, DS)
    assert err.value.field == "chosen" and "user turn" in str(err.value)


@pytest.mark.parametrize("fmt, row, field, words", [
    ("chatml.intel", {"chosen": C, "rejected": R}, "question", "missing"),
    ("chatml.intel", {"question": 7, "chosen": C, "rejected": R}, "question", "expected str"),
    ("llama3.prompt_pairs", {"prompt": Q, "chosen": C}, "rejected", "missing"),
    ("chatml.ultra", {"prompt": Q, "chosen": "4", "rejected": CONV_R}, "chosen", "expected list"),
    ("chatml.intel", {"system": 3, "question": Q, "chosen": C, "rejected": R}, "system", "expected text"),
])
def test_text_format_errors_name_the_field(fmt, row, field, words):
    with pytest.raises(RowError) as err:
        get_format(fmt, "paired").fn(row, DS)
    assert err.value.field == field and words in str(err.value)


def test_kto_label_required():
    with pytest.raises(RowError) as err:
        get_format("chatml.intel", "unpaired").fn({"question": Q, "completion": C}, DS)
    assert err.value.field == "label"


def test_zephyr_nectar(tokenizer):
    row = {"prompt": Q, "answers": [{"answer": "22", "rank": 3}, {"answer": "4", "rank": 1}, {"answer": "5", "rank": 2}]}
    rec = get_format("zephyr.nectar", "paired").fn(row, DS)
    assert rec == {"prompt": f"<|system|>\n</s>\n<|user|>\n{Q}</s>\n<|assistant|>\n", "chosen": "4", "rejected": "5"}
    out = tokenize_record(rec, "paired", tokenizer, 512, "truncate", "keep_end", TokenizeStats())
    assert tokenizer.decode(out["prompt_ids"]) == rec["prompt"]
    assert trained(tokenizer, out, "paired") == ["4<|im_end|>", "5<|im_end|>"]


def test_zephyr_nectar_needs_two_answers():
    with pytest.raises(RowError) as err:
        get_format("zephyr.nectar", "paired").fn({"prompt": Q, "answers": [{"answer": "4", "rank": 1}]}, DS)
    assert err.value.field == "answers"
