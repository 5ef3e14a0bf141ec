"""Dataset formats checked against Axolotl 0.19.0's own strategy functions, on records written for this check.

Axolotl is a test dependency: `make install-test` installs `axolotl` (pinned in constraints.txt) with `--no-deps`,
because its full dependency set pins another torch, transformers and TRL. The strategy modules compared here
(`axolotl/prompt_strategies/{dpo,kto}/{chatml,llama3,user_defined}.py`, `dpo/zephyr.py`, `dpo/chat_template.py`)
are loaded from the installed package's files: importing the package `axolotl.prompt_strategies` would first run
its `__init__`, which imports Axolotl's tokenising strategies and their dependencies (colorama, ...), none of which
the functions compared here use. `dpo/chat_template.py` imports `axolotl.utils.chat_templates`, which loads with
the torch, accelerate and transformers reinforge already has.

For every chatml.*/llama3.* DPO and KTO type and for user_defined, Axolotl's `transform_fn` and reinforge's format
run on the same rows and must give the same prompt/chosen/rejected (prompt/completion/label) strings. Where reinforge
deliberately differs (docs/datasets.md, "Differences from Axolotl"), the difference itself is asserted.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from reinforge.config.schema import DatasetConfig
from reinforge.data.errors import RowError
from reinforge.data.formats import resolve
from reinforge.data.tokenize import render

AXOLOTL_VERSION = "0.19.0"


@functools.cache
def axolotl_strategy(rel: str) -> ModuleType:
    """Axolotl's `axolotl/prompt_strategies/<rel>.py` from the installed axolotl distribution (see the module docstring)."""
    try:
        dist = importlib.metadata.distribution("axolotl")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"axolotl=={AXOLOTL_VERSION} is not installed in this environment: run `make install-test` "
                    "(installs it with --no-deps, see Makefile)")
    if dist.version != AXOLOTL_VERSION:
        pytest.fail(f"these checks are written against axolotl {AXOLOTL_VERSION}, found {dist.version}")
    path = Path(str(dist.locate_file(f"axolotl/prompt_strategies/{rel}.py")))
    spec = importlib.util.spec_from_file_location(f"axolotl_{AXOLOTL_VERSION.replace('.', '_')}_{rel.replace('/', '_')}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def axolotl(method: str, type_: str | dict[str, Any], row: dict[str, Any], tokenizer=None, **ds: Any) -> dict[str, Any]:
    """Axolotl 0.19's transform of `row` for `type_` (`chatml.intel`, a user_defined mapping, ...) under `rl: method`."""
    module, fn = ("user_defined", "default") if isinstance(type_, dict) else type_.rsplit(".", 1)
    cfg = {"datasets": [{"path": "rows.jsonl", "type": type_, **ds}]}
    made = getattr(axolotl_strategy(f"{method}/{module}"), fn)(cfg, dataset_idx=0)
    transform = made[0] if isinstance(made, tuple) else made
    sample = copy.deepcopy(row)
    return transform(sample, tokenizer=tokenizer) if tokenizer is not None else transform(sample)


def reinforge(kind: str, type_: str | dict[str, Any], row: dict[str, Any], **ds: Any) -> dict[str, Any]:
    """reinforge's canonical record of `row` for the dataset entry `{type: type_, **ds}`."""
    cfg = DatasetConfig(path="rows.jsonl", type=type_, **ds)
    rec = resolve(cfg, kind).fn(copy.deepcopy(row), cfg)
    rec.pop("_note", None)
    return rec


PAIRED, UNPAIRED = ("prompt", "chosen", "rejected"), ("prompt", "completion", "label")


def fields(rec: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: rec[k] for k in names}


# ---- records written for the check --------------------------------------------------------------------------------

S = "You are terse.\nAnswer in {braces} if asked."
Q = "What is 2+2? Use {x}, é and a\nsecond line."
C, R = "4, so {x} = 4.", "5"
Q2, C2, R2 = "And 3+3?", "6", "7"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


ONE_C, ONE_R = [msg("user", Q), msg("assistant", C)], [msg("user", Q), msg("assistant", R)]
MULTI_C = [msg("user", Q), msg("assistant", C), msg("user", Q2), msg("assistant", C2)]
MULTI_R = [msg("user", Q), msg("assistant", R), msg("user", Q2), msg("assistant", R2)]

DPO_ROWS = [
    ("default", {"system": S, "instruction": Q, "chosen_response": C, "rejected_response": R}),
    ("default", {"question": Q, "chosen": C, "rejected": R}),
    ("default", {"system": "", "input": Q, "chosen": C, "rejected": R}),
    ("default", {"prompt": Q, "input": "not the prompt", "chosen": C, "chosen_response": "no", "rejected": R}),
    ("argilla_chat", {"chosen": ONE_C, "rejected": ONE_R}),
    ("argilla_chat", {"chosen": MULTI_C, "rejected": MULTI_R}),  # both use the first exchange only
    ("argilla_chat", {"system": S, "chosen": ONE_C, "rejected": ONE_R}),  # both ignore the system column
    ("icr", {"system": S, "input": Q, "chosen": C, "rejected": R}),
    ("icr", {"input": Q, "chosen": C, "rejected": R}),
    ("intel", {"system": S, "question": Q, "chosen": C, "rejected": R}),
    ("intel", {"system": None, "question": Q, "chosen": C, "rejected": R}),
    ("prompt_pairs", {"system": S, "prompt": Q, "chosen": C, "rejected": R}),
    ("prompt_pairs", {"prompt": Q, "chosen": C, "rejected": R}),
    ("ultra", {"system": S, "prompt": Q, "chosen": ONE_C, "rejected": ONE_R}),
    ("ultra", {"prompt": Q, "chosen": MULTI_C, "rejected": MULTI_R}),
]

KTO_ROWS = [
    ("argilla", {"system": S, "instruction": Q, "completion": C, "label": True}),
    ("argilla", {"instruction": Q, "completion": C, "label": False}),
    ("argilla_chat", {"completion": ONE_C, "label": True}),
    ("argilla_chat", {"completion": MULTI_C, "label": False}),
    ("argilla_chat", {"completion": [msg("system", S)] + ONE_C, "label": True}),
    ("argilla_chat", {"system": "not used", "completion": [msg("system", S)] + MULTI_R, "label": False}),
    ("intel", {"system": S, "question": Q, "completion": C, "label": True}),
    ("intel", {"system": "", "question": Q, "completion": C, "label": False}),
    ("prompt_pairs", {"system": S, "prompt": Q, "completion": C, "label": True}),
    ("prompt_pairs", {"prompt": Q, "completion": C, "label": True}),
    ("ultra", {"system": S, "prompt": Q, "completion": C, "label": False}),
    ("ultra", {"system": None, "prompt": Q, "completion": C, "label": True}),
]

CHATML_TYPE = {"field_prompt": "question", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
               "prompt_format": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                                "<|im_start|>assistant\n",
               "chosen_format": "{chosen}<|im_end|>", "rejected_format": "{rejected}<|im_end|>"}
RENAMED = {"sys": S, "question": Q, "good": C, "bad": R}
DPO_USER_DEFINED = [
    ({}, {"system": S, "prompt": Q, "chosen": C, "rejected": R}),
    ({"prompt_format": "[{system}] {prompt}"}, {"system": S, "prompt": Q, "chosen": C, "rejected": R}),
    ({"prompt_format": "[{system}] {prompt}"}, {"prompt": Q, "chosen": C, "rejected": R}),
    ({"prompt_format": "[{system}] {prompt}"}, {"system": None, "prompt": Q, "chosen": C, "rejected": R}),
    (CHATML_TYPE, RENAMED),
    (CHATML_TYPE, {**RENAMED, "sys": ""}),
    ({"field_prompt": "question", "chosen_format": "{chosen}</s>"}, {"question": Q, "chosen": C, "rejected": R}),
]
KTO_USER_DEFINED = [
    ({}, {"system": S, "prompt": Q, "completion": C, "label": True}),
    ({"prompt_format": "[{system}] {prompt}", "completion_format": "{completion}</s>"},
     {"system": S, "prompt": Q, "completion": C, "label": False}),
    ({"field_prompt": "question", "field_system": "sys", "field_completion": "answer", "field_label": "ok",
      "prompt_format": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
      "completion_format": "{completion}<|im_end|>"},
     {"sys": S, "question": Q, "answer": C, "ok": True}),
]


def ids(cases: list[tuple]) -> list[str]:
    """`<suffix>-<row number>` (`user_defined-<n>` for mappings)."""
    return [f"{c[0] if isinstance(c[0], str) else 'user_defined'}-{i}" for i, c in enumerate(cases)]


# ---- exact matches ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("markup", ["chatml", "llama3"])
@pytest.mark.parametrize("suffix, row", DPO_ROWS, ids=ids(DPO_ROWS))
def test_dpo_text_formats_match_axolotl(markup, suffix, row):
    theirs = axolotl("dpo", f"{markup}.{suffix}", row)
    assert fields(reinforge("paired", f"{markup}.{suffix}", row), PAIRED) == fields(theirs, PAIRED)


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
@pytest.mark.parametrize("suffix, row", KTO_ROWS, ids=ids(KTO_ROWS))
def test_kto_text_formats_match_axolotl(markup, suffix, row):
    theirs = axolotl("kto", f"{markup}.{suffix}", row)
    assert fields(reinforge("unpaired", f"{markup}.{suffix}", row), UNPAIRED) == fields(theirs, UNPAIRED)


def test_kto_argilla_chat_multi_turn_history_is_the_prompt():
    # The rows above compare with Axolotl; this pins what that common result is for a multi-turn row.
    rec = reinforge("unpaired", "chatml.argilla_chat", {"completion": MULTI_C, "label": True})
    assert rec["prompt"] == (f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n{C}<|im_end|>\n"
                             f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n")
    assert rec["completion"] == f"{C2}<|im_end|>"
    rec = reinforge("unpaired", "llama3.argilla_chat", {"completion": [msg("system", S)] + ONE_C, "label": False})
    assert rec["prompt"] == (f"<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>"
                             f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rec["completion"] == f"{C}<|eot_id|>" and rec["label"] is False


@pytest.mark.parametrize("type_, row", DPO_USER_DEFINED, ids=ids(DPO_USER_DEFINED))
def test_dpo_user_defined_matches_axolotl(type_, row):
    assert fields(reinforge("paired", type_, row), PAIRED) == fields(axolotl("dpo", type_, row), PAIRED)


@pytest.mark.parametrize("type_, row", KTO_USER_DEFINED, ids=ids(KTO_USER_DEFINED))
def test_kto_user_defined_matches_axolotl(type_, row):
    assert fields(reinforge("unpaired", type_, row), UNPAIRED) == fields(axolotl("kto", type_, row), UNPAIRED)


# ---- documented differences (docs/datasets.md, "Differences from Axolotl") -----------------------------------------

@pytest.mark.parametrize("markup", ["chatml", "llama3"])
def test_dpo_argilla_is_default(markup):
    """Axolotl documents `chatml.argilla`/`llama3.argilla` for DPO with the record of `default`, but 0.19 has no such
    function (its loader fails: "Failed to load dataset transform function"); reinforge reads it as `default`."""
    assert not hasattr(axolotl_strategy(f"dpo/{markup}"), "argilla")
    for row in ({"system": S, "instruction": Q, "chosen_response": C, "rejected_response": R},
                {"instruction": Q, "chosen_response": C, "rejected_response": R}):
        assert fields(reinforge("paired", f"{markup}.argilla", row), PAIRED) \
            == fields(axolotl("dpo", f"{markup}.default", row), PAIRED)


def test_zephyr_nectar_ranks():
    """Axolotl takes the two largest rank numbers; in Nectar rank 1 is the best, reinforge chooses it."""
    three = {"prompt": Q, "answers": [{"answer": "22", "rank": 3}, {"answer": C, "rank": 1}, {"answer": R, "rank": 2}]}
    theirs, ours = axolotl("dpo", "zephyr.nectar", three), reinforge("paired", "zephyr.nectar", three)
    assert ours["prompt"] == theirs["prompt"] == f"<|system|>\n</s>\n<|user|>\n{Q}</s>\n<|assistant|>\n"
    assert (theirs["chosen"], theirs["rejected"]) == ("22", R)
    assert (ours["chosen"], ours["rejected"]) == (C, R)
    two = {"prompt": Q, "answers": [{"answer": C, "rank": 1}, {"answer": R, "rank": 2}]}
    theirs, ours = axolotl("dpo", "zephyr.nectar", two), reinforge("paired", "zephyr.nectar", two)
    assert (theirs["chosen"], theirs["rejected"]) == (R, C)
    assert (ours["chosen"], ours["rejected"]) == (C, R)


@pytest.mark.parametrize("markup", ["chatml", "llama3"])
def test_null_column(markup):
    """Axolotl picks a column that exists even when it is None in the row and writes 'None' into the text;
    reinforge's `default` picks the next column with a value, and the other formats report the field missing."""
    row = {"prompt": None, "input": Q, "chosen": None, "chosen_response": C, "rejected": R}
    theirs, ours = axolotl("dpo", f"{markup}.default", row), reinforge("paired", f"{markup}.default", row)
    wanted = reinforge("paired", f"{markup}.default", {"input": Q, "chosen_response": C, "rejected": R})
    assert "None" in theirs["prompt"] and theirs["chosen"].startswith("None<|")
    assert Q not in theirs["prompt"] and C not in theirs["chosen"]
    assert fields(ours, PAIRED) == fields(wanted, PAIRED) and Q in ours["prompt"] and ours["chosen"].startswith(C)
    # With the None column gone Axolotl agrees.
    assert fields(axolotl("dpo", f"{markup}.default", {"input": Q, "chosen_response": C, "rejected": R}), PAIRED) \
        == fields(wanted, PAIRED)

    row = {"question": None, "chosen": C, "rejected": R}
    theirs = axolotl("dpo", f"{markup}.intel", row)
    assert "None" in theirs["prompt"]
    with pytest.raises(RowError) as err:
        reinforge("paired", f"{markup}.intel", row)
    assert err.value.field == "question" and "missing" in str(err.value)

    row = {"prompt": Q, "completion": None, "label": True}
    assert axolotl("kto", f"{markup}.prompt_pairs", row)["completion"].startswith("None<|")
    with pytest.raises(RowError) as err:
        reinforge("unpaired", f"{markup}.prompt_pairs", row)
    assert err.value.field == "completion"


def test_null_column_user_defined():
    row = {"prompt": None, "chosen": C, "rejected": R}
    assert axolotl("dpo", {}, row)["prompt"] == "None"
    with pytest.raises(RowError) as err:
        reinforge("paired", {}, row)
    assert err.value.field == "prompt"


@pytest.mark.parametrize("system", ["", None, "absent"])
def test_kto_user_defined_empty_system(system):
    """Axolotl's KTO user_defined formats a `{system}` prompt without `system` when the row's system is empty or
    missing (KeyError); reinforge writes "" (as Axolotl's DPO user_defined does)."""
    type_ = {"prompt_format": "[{system}] {prompt}"}
    row = {"prompt": Q, "completion": C, "label": True} | ({} if system == "absent" else {"system": system})
    with pytest.raises(KeyError, match="system"):
        axolotl("kto", type_, row)
    assert reinforge("unpaired", type_, row)["prompt"] == f"[] {Q}"
    assert axolotl("dpo", type_, {**row, "chosen": C, "rejected": R})["prompt"] == f"[] {Q}"


def test_user_defined_other_columns():
    """Axolotl formats only the standard placeholders; reinforge fills any column by name."""
    type_ = {"prompt_format": "{topic}: {prompt}"}
    row = {"topic": "maths", "prompt": Q, "chosen": C, "rejected": R}
    with pytest.raises(KeyError, match="topic"):
        axolotl("dpo", type_, row)
    assert reinforge("paired", type_, row)["prompt"] == f"maths: {Q}"


@pytest.mark.parametrize("markup, end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_kto_argilla_chat_chosen_layout(markup, end):
    """The layout Axolotl documents for chatml KTO argilla_chat (user turn in `chosen`, answer in `completion`):
    Axolotl 0.19 ignores `chosen` and writes a prompt with no turn; reinforge takes the history from `chosen`."""
    row = {"chosen": [msg("user", Q)], "completion": [msg("assistant", C)], "label": True}
    theirs, ours = axolotl("kto", f"{markup}.argilla_chat", row), reinforge("unpaired", f"{markup}.argilla_chat", row)
    header = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}[markup]
    assert theirs["prompt"] == header
    assert ours["prompt"] == reinforge("unpaired", f"{markup}.argilla_chat", {"completion": ONE_C, "label": True})["prompt"]
    assert Q in ours["prompt"] and ours["prompt"].endswith(header)
    assert ours["completion"] == theirs["completion"] == C + end


# ---- chat_template (DPO): rendered with the tokenizer's template ---------------------------------------------------

def reinforge_texts(rec: dict[str, Any], tokenizer) -> dict[str, str]:
    """reinforge's conversational record as text: the prompt with the generation prompt, each response as what the
    template writes after it (what is trained)."""
    prompt = render(tokenizer, rec["prompt"], True)
    out = {"prompt": prompt}
    for name in ("chosen", "rejected"):
        full = render(tokenizer, rec["prompt"] + rec[name], False)
        assert full.startswith(prompt)
        out[name] = full[len(prompt):]
    return out


CT_ROWS = [
    ("chat_template.default", {"messages": [msg("user", Q)], "chosen": msg("assistant", C), "rejected": msg("assistant", R)}),
    ("chat_template.default", {"messages": [msg("system", S), msg("user", Q), msg("assistant", C), msg("user", Q2)],
                               "chosen": [msg("user", Q2), msg("assistant", C2)], "rejected": R2}),
    ("chat_template.default", {"messages": Q, "chosen": C, "rejected": R}),
    ("chat_template.argilla_chat", {"chosen": ONE_C, "rejected": ONE_R}),
    ("chat_template.argilla_chat", {"chosen": [msg("system", S)] + MULTI_C, "rejected": [msg("system", S)] + MULTI_R}),
]


@pytest.mark.parametrize("type_, row", CT_ROWS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CT_ROWS)])
def test_chat_template_same_prompt_response_keeps_template_newline(tokenizer, type_, row):
    """Same prompt text; Axolotl strips the template's text after the response end (`\\n` here), reinforge trains
    what the template writes after the prompt."""
    theirs = axolotl("dpo", type_, row, tokenizer=tokenizer)
    ours = reinforge_texts(reinforge("paired", type_, row), tokenizer)
    assert ours["prompt"] == theirs["prompt"]
    for name in ("chosen", "rejected"):
        assert ours[name] == theirs[name] + "\n"
        assert ours[name].endswith("<|im_end|>\n")


def test_chat_template_response_cut_at_str_find(tokenizer):
    """Axolotl cuts the response out of `[dummy user message, response]` at the first occurrence of the response
    text (`str.find`); a response that also occurs earlier in that rendering (here the word `user`, in the dummy
    turn's header) brings the dummy turn along. reinforge's response is what the template writes after the prompt."""
    row = {"messages": [msg("user", Q)], "chosen": msg("assistant", "user"), "rejected": msg("assistant", R)}
    theirs = axolotl("dpo", "chat_template.default", row, tokenizer=tokenizer)
    ours = reinforge_texts(reinforge("paired", "chat_template.default", row), tokenizer)
    assert theirs["chosen"] == "user\n[[dummy_message]]<|im_end|>\n<|im_start|>assistant\nuser<|im_end|>"
    assert ours["chosen"] == "user<|im_end|>\n"
    assert ours["prompt"] == theirs["prompt"] and ours["rejected"] == theirs["rejected"] + "\n"
