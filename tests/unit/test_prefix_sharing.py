"""Prefix-shared layout (worked out by hand): prompt once, then one branch per continuation."""

import torch

from reinforge.data.collate import PairedCollator, UnpairedCollator
from reinforge.data.packing import PackedCollator, attention_bias, pack_sequences
from reinforge.models.forward import segment_layout

PAD = 0


def test_pair_layout_by_hand():
    # prompt [1, 2, 3], chosen [4, 5], rejected [6]: prefix [1, 2], branches [3, 4, 5] and [3, 6]
    b = pack_sequences([([1, 2, 3, 4, 5], 3), ([1, 2, 3, 6], 3)], PAD, capacity=None, share_prefix=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]  # each branch continues from the prefix
    assert b["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0]]
    # the last prompt token, once per branch, predicts that branch's first completion token
    assert b["targets"].tolist() == [[-100, -100, 4, 5, -100, 6, -100]]
    assert b["seq_index"].tolist() == [[-1, -1, 0, 0, -1, 1, -1]]
    assert b["n_tokens"].tolist() == [2, 1]


def test_attention_pattern_by_hand():
    b = pack_sequences([([1, 2, 3, 4, 5], 3), ([1, 2, 3, 6], 3)], PAD, capacity=None, share_prefix=True)
    allowed = attention_bias(b["segment_ids"], b["branch_ids"])[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0, 0],   # prefix: causal
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],   # chosen branch: prefix + itself
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 0, 1, 0],   # rejected branch: prefix + itself, not the chosen tokens
                       [1, 1, 0, 0, 0, 1, 1]]
    layout = segment_layout(b["segment_ids"], b["branch_ids"])[0]
    assert [(a, e, p) for a, e, p, _ in layout] == [(0, 2, (0, 0)), (2, 5, (0, 2)), (5, 7, (0, 2))]
    # keys of a branch piece = prefix (2 tokens) then the branch: all of the prefix, causal in the branch
    assert layout[1][3].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert layout[2][3].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_paired_batch_shares_each_prompt_and_keeps_order():
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]}]
    b = PackedCollator(PairedCollator(PAD), PAD, capacity=None, share_prefix=True)(rows)
    # one row per pair: prefix (prompt[:-1]) | prompt[-1] + chosen | prompt[-1] + rejected
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6], [7, 8, 9, 8, 10, 11, 12]]
    assert b["seq_index"].tolist() == [[-1, -1, 0, 0, -1, 2, -1], [-1, 1, -1, 3, 3, 3, -1]]
    assert b["n_tokens"].tolist() == [2, 1, 1, 3] and b["n_pairs"] == 2
    # 7 + 7 tokens instead of 5 + 4 + 3 + 5 = 17
    assert int(b["attention_mask"].sum()) == 14


def test_kto_example_and_its_kl_sequence_share_the_prompt():
    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
            {"prompt_ids": [6, 7], "completion_ids": [8], "label": False}]
    # UnpairedCollator's sequences: [1,2,3,4,5], [6,7,8], KL: [1,2,3,8], [6,7,4,5]
    b = PackedCollator(UnpairedCollator(PAD), PAD, capacity=100, share_prefix=True)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 8, 6, 7, 8, 7, 4, 5]]
    assert b["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 0, 1, 1, 2, 2, 2]]
    assert b["segment_ids"].tolist() == [[0] * 7 + [1] * 6]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3]]
    assert b["seq_index"].tolist() == [[-1, -1, 0, 0, -1, 2, -1, -1, 1, -1, 3, 3, -1]]
    assert b["labels"].tolist() == [True, False]


def test_identical_prompts_of_different_rows_share_one_prefix():
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5]},
            {"prompt_ids": [1, 2, 3], "chosen_ids": [6], "rejected_ids": [7]}]
    b = PackedCollator(PairedCollator(PAD), PAD, capacity=None, share_prefix=True)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 3, 6, 3, 5, 3, 7]]
    assert b["branch_ids"].tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]
    assert b["seq_index"].tolist() == [[-1, -1, 0, -1, 1, -1, 2, -1, 3, -1]]


def test_nothing_to_share_falls_back_to_whole_sequences():
    # a one-token prompt has no prefix before its last token; different prompts are not grouped
    b = pack_sequences([([1, 4, 5], 1), ([1, 6], 1), ([2, 3, 7], 2)], PAD, capacity=None, share_prefix=True)
    assert "branch_ids" not in b
    assert b["input_ids"].tolist() == [[1, 4, 5], [1, 6, PAD], [2, 3, 7]]


def test_shared_unit_too_long_for_a_row_is_split():
    seqs = [([1, 2, 3, 4, 5], 3), ([1, 2, 3, 6], 3)]  # shared unit = 7 tokens, each sequence alone fits 5
    b = pack_sequences(seqs, PAD, capacity=5, share_prefix=True)
    assert "branch_ids" not in b
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, PAD]]
    assert pack_sequences(seqs, PAD, capacity=7, share_prefix=True)["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6]]


def test_packing_and_sharing_combined_with_padding_piece():
    seqs = [([1, 2, 3, 4, 5], 3), ([1, 2, 3, 6], 3), ([8, 9], 1)]
    b = pack_sequences(seqs, PAD, capacity=7, share_prefix=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6], [8, 9, PAD, PAD, PAD, PAD, PAD]]
    assert b["branch_ids"][1].tolist() == [1, 1, -1, -1, -1, -1, -1]
    layout = segment_layout(b["segment_ids"], b["branch_ids"])
    assert [(a, e, p) for a, e, p, _ in layout[1]] == [(0, 2, (0, 0)), (2, 7, None)]
    allowed = attention_bias(b["segment_ids"], b["branch_ids"])[1, 0]
    assert bool(allowed.diagonal().all())  # every query, padding included, has a key: no empty softmax
    assert not bool(allowed[2:, :2].any()) and not bool(allowed[:2, 2:].any())
    assert torch.equal(b["n_tokens"], torch.tensor([2, 1, 1]))
