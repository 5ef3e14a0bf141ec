"""Completion-only masking, token by token, on a real chat-templated example."""

import json

import pytest
import torch

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator
from reinforge.data.formats import get_format
from reinforge.data.tokenize import TokenizeStats, adds_bos, tokenize_record

from conftest import DATA_DIR, TOKENIZER_DIR

DS = DatasetConfig(path="dpo_en_demo.json", type="chat_template.default", field_messages="conversations",
                   message_property_mappings={"role": "from", "content": "value"},
                   roles={"user": ["human"], "assistant": ["gpt"]})


def test_only_completion_tokens_are_scored(tokenizer):
    row = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[0]
    record = get_format("chat_template.default", "paired").fn(row, DS)
    stats = TokenizeStats()
    out = tokenize_record(record, "paired", tokenizer, 4096, "truncate", "keep_start", stats)
    prompt_text = tokenizer.decode(out["prompt_ids"])
    # The prompt ends with the generation prompt of the ChatML template; the completion is the answer + end.
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(out["chosen_ids"]) == row["chosen"]["value"] + "<|im_end|>\n"
    assert tokenizer.decode(out["rejected_ids"]) == row["rejected"]["value"] + "<|im_end|>\n"
    assert stats.boundary_merges == 0

    batch = PairedCollator(tokenizer.pad_token_id)([out])
    P, C = len(out["prompt_ids"]), len(out["chosen_ids"])
    ids, targets, seq = batch["input_ids"][0], batch["targets"][0], batch["seq_index"][0]
    for t in range(ids.shape[0]):
        predicts_completion = P <= t + 1 < P + C
        if predicts_completion:
            assert targets[t] == ids[t + 1] and seq[t] == 0, t
        else:
            assert targets[t] == IGNORE and seq[t] == -1, t
    assert int(batch["n_tokens"][0]) == C
    # the rejected sequence is row 1 (sequences: chosen..., rejected...)
    assert int((batch["seq_index"][1] == 1).sum()) == len(out["rejected_ids"])
    assert torch.equal(batch["input_ids"][1, :P], batch["input_ids"][0, :P])


@pytest.fixture(scope="module")
def bos_adding_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer made Llama-style (SmolLM2's own adds no BOS, so it cannot show a doubled one): its
    post-processor prepends BOS = <|endoftext|> to every text, and the chat template writes {{ bos_token }}
    first. Saved and loaded back, as a user's tokenizer directory would be."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", 0)])
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    out = tmp_path_factory.mktemp("bos-tokenizer")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def test_no_double_bos(bos_adding_tokenizer):
    tok = bos_adding_tokenizer
    bos = tok.bos_token_id
    assert adds_bos(tok) and tok("hi")["input_ids"][0] == bos
    msgs = [{"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # what a pipeline that tokenises the rendered template with the tokenizer's special tokens gets: two BOS
    assert tok(rendered)["input_ids"][:2] == [bos, bos]

    stats = TokenizeStats()
    record = {"prompt": msgs, "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}
    out = tokenize_record(record, "paired", tok, 4096, "truncate", "keep_start", stats)
    assert out["prompt_ids"][0] == bos and out["prompt_ids"][1] != bos
    assert out["prompt_ids"].count(bos) == 1 and bos not in out["chosen_ids"] + out["rejected_ids"]
    assert tok.decode(out["prompt_ids"]) == rendered
    # plain text: the tokenizer's BOS once; text that already starts with BOS gets no second one; text that
    # starts with two keeps one, counted
    hi = tok("hi", add_special_tokens=False)["input_ids"][0]
    for prompt in ("hi", "<|endoftext|>hi"):
        out = tokenize_record({"prompt": prompt, "chosen": " a", "rejected": " b"}, "paired", tok, 4096, "truncate",
                              "keep_start", stats)
        assert out["prompt_ids"] == [bos, hi], prompt
    assert stats.double_bos_removed == 0
    out = tokenize_record({"prompt": "<|endoftext|><|endoftext|>hi", "chosen": " a", "rejected": " b"}, "paired", tok,
                          4096, "truncate", "keep_start", stats)
    assert out["prompt_ids"] == [bos, hi]
    assert stats.double_bos_removed == 3  # prompt, prompt+chosen, prompt+rejected

    # and through a chat_template.default dataset row (the e2e path): one BOS in front of the prompt
    row = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[0]
    out = tokenize_record(get_format("chat_template.default", "paired").fn(row, DS), "paired", tok, 4096, "truncate",
                          "keep_start", TokenizeStats())
    assert out["prompt_ids"][0] == bos and out["prompt_ids"][1] != bos
