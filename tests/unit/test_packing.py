"""Packed batch layout (worked out by hand), the collator wrapper, the attention pattern, config keys."""

import pytest
import torch

from reinforge.config import ConfigError
from reinforge.config.loader import build_config
from reinforge.data.collate import PairedCollator, UnpairedCollator, pad_sequences
from reinforge.data.packing import UNLIMITED, PackedCollator, attention_bias, build_collator, pack_sequences, unpad_sequences
from reinforge.models.forward import segment_layout

PAD = 0
BASE = {"base_model": "m", "rl": "dpo", "datasets": [{"path": "d.json", "type": "chat_template.default"}]}


def test_first_fit_decreasing_layout_by_hand():
    # lengths 4, 2, 3 into rows of 5: [seq0] then seq2 (3) opens row 1, seq1 (2) fits after it
    seqs = [([1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 9], 1)]
    b = pack_sequences(seqs, PAD, capacity=5)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, PAD], [7, 8, 9, 5, 6]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]  # restart per sequence and on padding
    # seq0 scores tokens 3, 4 (predicted at positions 1, 2); seq2 scores 8, 9; seq1 scores 6
    assert b["targets"].tolist() == [[-100, 3, 4, -100, -100], [8, 9, -100, 6, -100]]
    assert b["seq_index"].tolist() == [[-1, 0, 0, -1, -1], [2, 2, -1, 1, -1]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, -1], [0, 0, 0, 1, 1]]
    assert b["n_tokens"].tolist() == [2, 1, 2]
    assert "branch_ids" not in b


def test_no_capacity_limit_is_one_row_without_padding():
    seqs = [([1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 9], 1)]
    b = pack_sequences(seqs, PAD, capacity=10**9)
    assert b["input_ids"].shape == (1, 9)
    assert bool(b["attention_mask"].all())
    assert sorted(b["input_ids"][0].tolist()) == list(range(1, 10))


def test_unit_longer_than_capacity_gets_its_own_row():
    b = pack_sequences([([1, 2, 3, 4, 5, 6], 1), ([7, 8], 1)], PAD, capacity=4)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, PAD, PAD, PAD, PAD]]


def test_one_unit_per_row_equals_padded_layout():
    seqs = [([1, 2, 3, 4], 2), ([5, 6], 0), ([7, 8, 9], 3)]
    packed, padded = pack_sequences(seqs, PAD, capacity=None), pad_sequences(seqs, PAD)
    for key in ("input_ids", "attention_mask", "targets", "seq_index", "n_tokens"):
        assert torch.equal(packed[key], padded[key]), key


def test_unpad_inverts_pad_sequences():
    seqs = [([1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 9], 3)]  # the last one scores nothing
    assert unpad_sequences(pad_sequences(seqs, PAD)) == seqs
    assert unpad_sequences(pad_sequences([([5, 6], 0)], PAD)) == [([5, 6], 1)]  # first token is never scored
    with pytest.raises(ValueError, match="one row per sequence"):
        unpad_sequences(pack_sequences(seqs, PAD, capacity=100))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="capacity"):
        pack_sequences([([1, 2], 1)], PAD, capacity=0)
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([([], 0)], PAD, capacity=4)
    with pytest.raises(ValueError, match="neither"):
        PackedCollator(PairedCollator(PAD), PAD, capacity=None, share_prefix=False)


def test_collator_keeps_sequence_order_and_passes_keys_through():
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "ref_chosen_logps": -1.0,
             "ref_rejected_logps": -2.0},
            {"prompt_ids": [7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13], "ref_chosen_logps": -3.0,
             "ref_rejected_logps": -4.0}]
    padded = PairedCollator(PAD)(rows)
    packed = PackedCollator(PairedCollator(PAD), PAD, capacity=64, share_prefix=False)(rows)
    assert packed["n_pairs"] == 2
    assert torch.equal(packed["ref_logps"], padded["ref_logps"])
    assert torch.equal(packed["n_tokens"], padded["n_tokens"])
    # every sequence's scored targets, in order, are the same (sequences: chosen_0, chosen_1, rejected_0, rejected_1)
    for s in range(4):
        assert packed["targets"][packed["seq_index"] == s].tolist() == padded["targets"][padded["seq_index"] == s].tolist()
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())  # same tokens, no duplicate
    assert packed["input_ids"].shape == (1, 17)  # 17 real tokens, no padding (padded: 4 × 5)


def test_unpaired_collator_is_repacked_with_its_labels():
    rows = [{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5], "label": True},
            {"prompt_ids": [6, 7, 8], "completion_ids": [9], "label": False}]
    padded = UnpairedCollator(PAD)(rows)
    packed = PackedCollator(UnpairedCollator(PAD), PAD, capacity=64, share_prefix=False)(rows)
    assert packed["labels"].tolist() == [True, False] and packed["n_examples"] == 2
    assert torch.equal(packed["n_tokens"], padded["n_tokens"])
    assert packed["input_ids"].shape[0] == 1


def test_attention_bias_by_hand():
    # row: unit 0 = tokens 0-1, unit 1 = tokens 2-4, padding at 5
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = attention_bias(seg)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]


def test_segment_layout_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    layout = segment_layout(seg, None)
    assert [(a, b, p) for a, b, p, _ in layout[0]] == [(0, 2, (0, 0)), (2, 5, (0, 0)), (5, 6, None)]
    assert all(m is None for *_, m in layout[0])  # plain causal pieces


def test_config_defaults_and_validation():
    cfg = build_config(BASE)
    assert cfg.sample_packing_value and cfg.prefix_sharing_value and cfg.chunked_logprobs
    assert cfg.packing_length_value is None
    grpo = {**BASE, "rl": "grpo", "micro_batch_size": 2, "trl": {"reward_funcs": ["m.f"], "num_generations": 2}}
    g = build_config(grpo)
    assert g.sample_packing_value and g.prefix_sharing_value  # the completions of a prompt share it
    assert not build_config({**grpo, "prefix_sharing": False}).prefix_sharing_value
    ebft = {**BASE, "rl": "ebft", "micro_batch_size": 8}  # structured EBFT trains on GRPO's layout
    assert build_config(ebft).sample_packing_value and build_config(ebft).prefix_sharing_value
    with pytest.raises(ConfigError, match="packing_length is used only with sample_packing"):
        build_config({**BASE, "sample_packing": False, "packing_length": 512})
    with pytest.raises(ConfigError):
        build_config({**BASE, "packing_length": 4})  # below the minimum
    assert not build_config({**BASE, "sample_packing": False}).sample_packing_value


def test_build_collator_follows_config():
    off = build_config({**BASE, "sample_packing": False, "prefix_sharing": False})
    assert isinstance(build_collator(off, "paired", PAD), PairedCollator)
    kto = build_config({**BASE, "rl": "kto", "micro_batch_size": 2, "sample_packing": False, "prefix_sharing": False,
                        "sequence_len": 64})
    inner = build_collator(kto, "unpaired", PAD)
    assert isinstance(inner, UnpairedCollator) and inner.max_length == 64
    on = build_collator(build_config({**BASE, "packing_length": 512}), "paired", PAD)
    assert isinstance(on, PackedCollator) and on.capacity == 512 and on.share_prefix
    default = build_collator(build_config(BASE), "paired", PAD)
    assert default.capacity == UNLIMITED and default.share_prefix
    share_only = build_collator(build_config({**BASE, "sample_packing": False}), "paired", PAD)
    assert share_only.capacity is None and share_only.share_prefix
    with pytest.raises(ValueError, match="data kind"):
        build_collator(off, "prompt", PAD)
