"""Tokenisation rules: BOS never doubled, prompt is a prefix, boundary merges counted, length handling, templates."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from reinforge.data.errors import RowError
from reinforge.data.tokenize import (RecordError, TokenizeStats, adds_bos, fit_length, split_prompt_completions,
                                     tokenize_record, tokenize_records)
from reinforge.models.chat_templates import TEMPLATES, resolve_chat_template, valid_names

WORDS = ["<s>", "</s>", "<unk>", "hello", "world", "a", "b", "c", "user", "assistant", ":"]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that prepends <s> by default (like Llama's), with a template that writes bos_token."""
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}")
    return tok


def test_adds_bos(bos_tokenizer, tokenizer):
    assert adds_bos(bos_tokenizer) is True
    assert adds_bos(tokenizer) is False  # SmolLM2 adds nothing by default


def test_text_record_gets_one_bos(bos_tokenizer):
    st = TokenizeStats()
    out = tokenize_record({"prompt": "hello", "chosen": " a", "rejected": " b"}, "paired", bos_tokenizer, 64, "truncate",
                          "keep_end", st)
    # TRL tokenises text with the tokenizer's special tokens: BOS first; EOS appended to each response
    assert out == {"prompt_ids": [0, 3], "chosen_ids": [5, 1], "rejected_ids": [6, 1]}
    assert st.eos_appended == 1 and st.double_bos_removed == 0


def test_text_that_starts_with_bos_gets_no_second_one(bos_tokenizer):
    out = tokenize_record({"prompt": "<s> hello", "chosen": " a </s>", "rejected": " b </s>"}, "paired", bos_tokenizer, 64,
                          "truncate", "keep_end", st := TokenizeStats())
    assert out["prompt_ids"] == [0, 3]
    assert st.eos_appended == 0


def test_double_bos_in_data_is_removed_and_counted(bos_tokenizer):
    out = tokenize_record({"prompt": "<s> <s> hello", "chosen": " a", "rejected": " b"}, "paired", bos_tokenizer, 64,
                          "truncate", "keep_end", st := TokenizeStats())
    assert out["prompt_ids"] == [0, 3]
    assert st.double_bos_removed == 3  # prompt, prompt+chosen, prompt+rejected


def test_chat_template_writing_bos_gives_one_bos(bos_tokenizer):
    rec = {"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    out = tokenize_record(rec, "paired", bos_tokenizer, 64, "truncate", "keep_end", TokenizeStats())
    # "<s>user : hello assistant : " → the template's <s> only
    assert out["prompt_ids"] == [0, 8, 10, 3, 9, 10]
    assert out["chosen_ids"] == [5] and out["rejected_ids"] == [6]


def test_prompt_is_prefix_and_boundary_merge_counted(tokenizer):
    # SmolLM2: "hel" alone is one token, "hello" another: the prompt's last token merges with the completion.
    prompt_ids, comps, merged = split_prompt_completions(tokenizer, "Say hel", ["lo", "p"])
    assert merged is True
    assert tokenizer.decode(prompt_ids) + tokenizer.decode(comps[0]) == "Say hello"
    assert tokenizer.decode(prompt_ids) + tokenizer.decode(comps[1]) == "Say help"
    full = tokenizer("Say hello", add_special_tokens=False)["input_ids"]
    assert prompt_ids + comps[0] == full
    st = TokenizeStats()
    tokenize_record({"prompt": "Say hel", "chosen": "lo", "rejected": "p"}, "paired", tokenizer, 64, "truncate",
                    "keep_end", st)
    assert st.boundary_merges == 1
    tokenize_record({"prompt": "Say", "chosen": " hello", "rejected": " help"}, "paired", tokenizer, 64, "truncate",
                    "keep_end", st)
    assert st.boundary_merges == 1


def test_fit_length_by_hand():
    p, c, r = [1, 2, 3, 4], [5, 6, 7], [8]
    # fits: 4 + 3 = 7 <= 7
    assert fit_length(p, [c, r], 7, "truncate", "keep_start") == (p, [c, r], "ok")
    # keep_start, max 6: room = 6 - 4 = 2 → completions cut at the end
    assert fit_length(p, [c, r], 6, "truncate", "keep_start") == (p, [[5, 6], [8]], "truncated")
    # keep_end, max 6: longest completion 3 → keep the last 3 prompt tokens
    assert fit_length(p, [c, r], 6, "truncate", "keep_end") == ([2, 3, 4], [c, r], "truncated")
    # keep_start with the prompt alone filling max_len → dropped (no completion token left)
    assert fit_length(p, [c, r], 4, "truncate", "keep_start")[2] == "dropped_no_completion"
    # keep_end with a completion longer than max_len: no prompt, completion keeps its end
    assert fit_length(p, [c, r], 2, "truncate", "keep_end") == ([], [[6, 7], [8]], "truncated")
    assert fit_length(p, [c, r], 6, "drop", "keep_end")[2] == "dropped_too_long"
    with pytest.raises(RowError, match="7 tokens > sequence_len 6"):
        fit_length(p, [c, r], 6, "raise", "keep_end")


def test_counts_and_invariant(tokenizer):
    long = "word " * 100
    recs = [{"prompt": "Q", "chosen": "A", "rejected": "B"},
            {"prompt": long, "chosen": "A", "rejected": "B"},
            {"prompt": "Q", "chosen": long, "rejected": "B"}]
    st = TokenizeStats(records=3)
    out = tokenize_records(recs, "paired", tokenizer, 20, "truncate", "keep_start", st)
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert (st.rows_out, st.dropped_no_completion, st.truncated) == (2, 1, 1)
    assert st.rows_out == st.records - st.duplicates - st.dropped_too_long - st.dropped_no_completion
    assert len(out[2]["prompt_ids"]) + len(out[2]["chosen_ids"]) == 20
    st2 = TokenizeStats()
    assert tokenize_records(recs, "paired", tokenizer, 20, "drop", "keep_start", st2)[2] is None
    assert st2.dropped_too_long == 2


def test_raise_names_the_record(tokenizer):
    recs = [{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q " * 50, "chosen": "A", "rejected": "B"}]
    with pytest.raises(RecordError) as err:
        tokenize_records(recs, "paired", tokenizer, 20, "raise", "keep_end", TokenizeStats())
    assert err.value.index == 1 and err.value.field == "sequence"


def test_batched_equals_one_by_one(tokenizer):
    recs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": f"a{i}"}],
             "label": i % 2 == 0} for i in range(5)]
    many = tokenize_records(recs, "unpaired", tokenizer, 64, "truncate", "keep_end", TokenizeStats())
    assert many == [tokenize_record(r, "unpaired", tokenizer, 64, "truncate", "keep_end", TokenizeStats()) for r in recs]


def test_prompt_kind_ids_and_over_length_count(tokenizer):
    recs = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}, {"prompt": "Hello there, how are you?"}]
    st = TokenizeStats()
    out = tokenize_records(recs, "prompt", tokenizer, 64, "truncate", "keep_end", st, max_prompt_length=5)
    assert tokenizer.decode(out[0]["prompt_ids"]).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(out[1]["prompt_ids"]) == "Hello there, how are you?"
    assert st.prompts_over_max_length == 2 and st.rows_out == 2


def test_percentiles_nearest_rank():
    st = TokenizeStats(lengths={"prompt": [10, 20, 30, 40]})
    # nearest rank: p50 → ceil(0.5*4)=2nd value; p90 → ceil(3.6)=4th
    assert st.percentiles()["prompt"] == {"min": 10, "p50": 20, "p90": 40, "p95": 40, "p99": 40, "max": 40, "mean": 25.0}


def test_chat_template_failure_is_a_record_error(tokenizer):
    rec = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
           "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(RecordError) as err:
        tokenize_records([rec], "paired", tokenizer, 64, "truncate", "keep_end", TokenizeStats(),
                         {"chat_template": TEMPLATES["gemma"]})
    assert err.value.index == 0 and "no system role" in str(err.value)


MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("name, expected", [
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    ("qwen_25", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    ("llama3", "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"),
    ("phi_3", "<|im_start|><|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\nA<|end|>\n"),
])
def test_named_templates_render(tokenizer, name, expected):
    # SmolLM2's bos_token is <|im_start|>, which makes the templates' BOS visible here
    assert tokenizer.apply_chat_template(MSGS, tokenize=False, chat_template=TEMPLATES[name]) == expected


def test_gemma_mistral_and_qwen_default_system(tokenizer):
    msgs = MSGS[1:]
    assert tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                         chat_template=TEMPLATES["gemma"]) == \
        "<|im_start|><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
    assert tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True,
                                         chat_template=TEMPLATES["gemma"]).endswith("<start_of_turn>model\n")
    assert tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=TEMPLATES["mistral_v1"]) == \
        "<|im_start|> [INST] Q [/INST] A<|im_end|>"
    assert tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=TEMPLATES["qwen_25"]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_resolve_chat_template(tokenizer, bos_tokenizer):
    assert resolve_chat_template(None, None, tokenizer) is None
    assert resolve_chat_template("tokenizer_default", None, tokenizer) is None
    assert resolve_chat_template("chatml", None, tokenizer) == TEMPLATES["chatml"]
    assert resolve_chat_template("jinja", "{{ 'x' }}", tokenizer) == "{{ 'x' }}"
    assert resolve_chat_template("tokenizer_default_fallback_llama3", None, tokenizer) is None  # has its own
    no_template = PreTrainedTokenizerFast(tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>")
    assert resolve_chat_template("tokenizer_default_fallback_llama3", None, no_template) == TEMPLATES["llama3"]
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_chat_template("tokenizer_default", None, no_template)
    with pytest.raises(ValueError, match="valid: tokenizer_default"):
        resolve_chat_template("chatmlx", None, tokenizer)
    assert "tokenizer_default_fallback_chatml" in valid_names()


def test_llama3_template_with_bos_adding_tokenizer_has_one_bos(bos_tokenizer):
    rec = {"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    out = tokenize_record(rec, "paired", bos_tokenizer, 64, "truncate", "keep_end", st := TokenizeStats(),
                          {"chat_template": TEMPLATES["llama3"]})
    assert out["prompt_ids"][0] == 0 and out["prompt_ids"][1] != 0
    assert st.double_bos_removed == 0


def test_same_ids_as_trl_dpo_tokenisation(tokenizer):
    """TRL 1.16's DPO preprocessing: `_tokenize` prompt, prompt+chosen, prompt+rejected (EOS appended to text
    responses first), then split at the common prefix. reinforge's batched path gives the same ids."""
    import json
    from pathlib import Path

    from trl.data_utils import _tokenize, common_prefix_length

    from reinforge.config.schema import DatasetConfig
    from reinforge.data.formats import get_format

    ds = DatasetConfig(path="x", type="chat_template.default", field_messages="conversations",
                       message_property_mappings={"role": "from", "content": "value"},
                       roles={"user": ["human"], "assistant": ["gpt"]})
    rows = json.loads((Path(__file__).resolve().parents[2] / "examples/data/dpo_en_demo.json").read_text())[:12]
    recs = [get_format("chat_template.default", "paired").fn(r, ds) for r in rows]
    recs += [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green<|im_end|>"},
             {"prompt": "Say hel", "chosen": "lo", "rejected": "p"}]
    ours = tokenize_records(recs, "paired", tokenizer, 100_000, "truncate", "keep_end", TokenizeStats())
    eos = tokenizer.eos_token
    for rec, got in zip(recs, ours):
        conv = isinstance(rec["prompt"], list)
        c, r = rec["chosen"], rec["rejected"]
        if not conv:
            c, r = (x if x.endswith(eos) else x + eos for x in (c, r))
        p_ids = _tokenize(tokenizer, rec["prompt"], **({"add_generation_prompt": True} if conv else {}))["input_ids"]
        pc = _tokenize(tokenizer, rec["prompt"] + c)["input_ids"]
        pr = _tokenize(tokenizer, rec["prompt"] + r)["input_ids"]
        n = min(common_prefix_length(p_ids, pc), common_prefix_length(p_ids, pr))
        assert got == {"prompt_ids": p_ids[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}
