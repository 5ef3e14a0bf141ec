"""Completion-only masking, token by token, on a real chat-templated example."""

import json

import torch

from reinforge.config.schema import DatasetConfig
from reinforge.data.collate import IGNORE, PairedCollator
from reinforge.data.formats import get_format
from reinforge.data.tokenize import TokenizeStats, tokenize_record

from conftest import DATA_DIR

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


def test_no_double_bos(tokenizer):
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}
    out = tokenize_record(record, "paired", tokenizer, 4096, "truncate", "keep_start", TokenizeStats())
    first = out["prompt_ids"][:2]
    assert not (first[0] == first[1] == tokenizer.bos_token_id)
