"""Loss aggregations grpo / bnpo / dr_grpo / dapo: by hand and against TRL 1.16's
GRPOTrainer._compute_loss (run on a stand-in object, full loss including clipping and KL)."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from reinforge.algorithms.aggregation import aggregate_loss
from reinforge.algorithms.policy_losses import policy_loss_terms
from reinforge.algorithms.policy_losses import CLIPPED_SURROGATE_LOSS_TYPES


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# B = 2 completions, T = 3 positions; the 99 is padding and must never count.
LOSS = t([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
MASK = t([[1, 1, 0], [1, 1, 1]])


def test_grpo_by_hand():
    # per-sequence means (1+2)/2 = 1.5 and (3+4+5)/3 = 4, then the mean over sequences: 2.75
    assert aggregate_loss(LOSS, MASK, "grpo").item() == pytest.approx(2.75)
    assert aggregate_loss(LOSS, MASK, "grpo", gradient_accumulation_steps=2).item() == pytest.approx(2.75 / 2)


def test_bnpo_by_hand():
    # token mean of the micro-batch: (1+2+3+4+5)/5 = 3
    assert aggregate_loss(LOSS, MASK, "bnpo").item() == pytest.approx(3.0)
    assert aggregate_loss(LOSS, MASK, "bnpo", gradient_accumulation_steps=4).item() == pytest.approx(0.75)


def test_dr_grpo_by_hand():
    # sum 15 over the constant B·L = 2·4 = 8 → 1.875
    assert aggregate_loss(LOSS, MASK, "dr_grpo", max_completion_length=4).item() == pytest.approx(15 / 8)
    assert aggregate_loss(LOSS, MASK, "dr_grpo", max_completion_length=4,
                          gradient_accumulation_steps=3).item() == pytest.approx(15 / 8 / 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(LOSS, MASK, "dr_grpo")


def test_dapo_by_hand():
    # sum 15 over the tokens of the whole accumulation window (here 10, e.g. two micro-batches of 5):
    # 1.5; no further division by GA — the window normaliser already accounts for it
    assert aggregate_loss(LOSS, MASK, "dapo", num_items_in_batch=10).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS, MASK, "dapo", num_items_in_batch=torch.tensor(10),
                          gradient_accumulation_steps=2).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS, MASK, "dapo", num_items_in_batch=0).item() == pytest.approx(15.0)  # clamped to 1
    with pytest.raises(ValueError, match="num_items_in_batch"):
        aggregate_loss(LOSS, MASK, "dapo")


def test_sequence_level_loss_broadcasts_over_tokens():
    seq = t([[2.0], [3.0]])
    # grpo: each sequence's value is its own mean → (2 + 3)/2 = 2.5 (GSPO's objective)
    assert aggregate_loss(seq, MASK, "grpo").item() == pytest.approx(2.5)
    # bnpo counts each sequence once per token: (2·2 + 3·3)/5 = 13/5
    assert aggregate_loss(seq, MASK, "bnpo").item() == pytest.approx(13 / 5)
    assert aggregate_loss(seq, MASK, "dr_grpo", max_completion_length=4).item() == pytest.approx(13 / 8)


def test_fully_masked_row_and_unknown_type():
    mask = t([[0, 0, 0], [1, 1, 1]])
    # grpo: empty row contributes 0 but still counts in the mean over B: (0 + 4)/2 = 2
    assert aggregate_loss(LOSS, mask, "grpo").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        aggregate_loss(LOSS, MASK, "ppo")


def test_gradient_flows():
    loss = LOSS.clone().requires_grad_()
    aggregate_loss(loss, MASK, "grpo").backward()
    # d/dl of mean_i(Σ_t m l / n_i): 1/(2·2) for row 1's tokens, 1/(2·3) for row 2's, 0 on padding
    assert loss.grad.tolist() == [pytest.approx([0.25, 0.25, 0.0]), pytest.approx([1 / 6] * 3)]


# ---------------------------------------------------------------- against TRL 1.16


def trl_compute_loss(per_token_logps, inputs, *, loss_type, beta, level, eps_low, eps_high, max_completion_length, ga):
    """TRL's real GRPOTrainer._compute_loss on a stand-in carrying only the attributes it reads; the
    model forward is replaced by returning `per_token_logps`."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    ns = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=ga),
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=ga,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False,
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    return GRPOTrainer._compute_loss(ns, None, inputs)


# the loss types whose per-token loss is grpo_per_token_loss's; the others: tests/unit/test_policy_losses.py
@pytest.mark.parametrize("loss_type", CLIPPED_SURROGATE_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("ga", [1, 3])
def test_matches_trl(loss_type, level, beta, ga):
    g = torch.Generator().manual_seed(1)
    b, t_len, max_len = 3, 6, 8
    logps = -torch.rand(b, t_len, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(b, t_len, generator=g, dtype=torch.float64) - 0.5) * 0.9
    ref = logps + (torch.rand(b, t_len, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.ones(b, t_len, dtype=torch.long)
    mask[0, 2:] = 0
    mask[1, 5:] = 0
    adv = t([0.9, -1.1, 0.4])
    # TRL's num_items_in_batch counts the generation batch's loss tokens; with steps_per_generation = GA
    # and one process that batch is the accumulation window (here pretend the other micro-batches hold 17 tokens)
    num_items = mask.sum() + 17
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones(b, t_len, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": num_items,
    }
    trl_logps = logps.clone().requires_grad_()
    trl_loss = trl_compute_loss(trl_logps, inputs, loss_type=loss_type, beta=beta, level=level, eps_low=0.2,
                                eps_high=0.2, max_completion_length=max_len, ga=ga)
    trl_loss.backward()

    our_logps = logps.clone().requires_grad_()
    terms = policy_loss_terms(our_logps, adv, mask, epsilon_low=0.2, epsilon_high=0.2, old_per_token_logps=old,
                                importance_sampling_level=level, beta=beta, ref_per_token_logps=ref)
    loss = aggregate_loss(terms.per_token_loss, mask, loss_type, max_completion_length=max_len,
                          num_items_in_batch=num_items, gradient_accumulation_steps=ga)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, atol=1e-6, rtol=0)
    assert our_logps.grad.abs().sum() > 0
