"""Async GRPO's pieces by hand and against TRL 1.16: the off-policy sequence mask, the bias-corrected KL, the
replay buffer's selection, deferred re-rolls and the background prefetcher."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from reinforge.algorithms.aggregation import aggregate_loss
from reinforge.algorithms.importance_sampling import off_policy_sequence_mask
from reinforge.algorithms.policy_losses import policy_loss_terms
from reinforge.rollout.curate import (ReplayBuffer, RerollBuffer, failed_groups, replay_scores, zero_signal_groups)
from reinforge.rollout.prefetch import Prefetcher
from reinforge.rollout.types import Rollout

from test_policy_losses import trl_compute_loss


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- off-policy sequence mask


def test_off_policy_mask_by_hand():
    # two tokens each; gaps (sampler − current): seq 0: (0.4, 0.2) → 0.3; seq 1: (1.0, masked 5.0) → 1.0;
    # seq 2: (0.9, 0.9) → 0.9 but a positive advantage; seq 3: NaN sampler token counts as gap 0 → (0.0+0.8)/2 = 0.4
    current = t([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    sampler = t([[-0.6, -0.8], [0.0, 4.0], [-0.1, -0.1], [float("nan"), -0.2]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv = t([-1.0, -1.0, 2.0, -0.5])
    keep = off_policy_sequence_mask(adv, current, sampler, mask, threshold=0.35)
    assert keep.shape == (4, 1)
    assert keep.squeeze(1).tolist() == [1.0, 0.0, 1.0, 0.0]  # 0.3 ≤ 0.35 kept; 1.0, 0.4 > 0.35 with Â < 0 dropped
    assert off_policy_sequence_mask(adv, current, sampler, mask, threshold=0.5).squeeze(1).tolist() == [1, 0, 1, 1]


def test_off_policy_mask_matches_trl():
    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(3)
    current = -torch.rand(6, 7, generator=g, dtype=torch.float64)
    sampler = current + (torch.rand(6, 7, generator=g, dtype=torch.float64) - 0.3)
    sampler[2, 3] = float("nan")
    mask = (torch.rand(6, 7, generator=g) > 0.2).long()
    adv = t([1.0, -1.0, -0.5, 0.0, -2.0, 0.3]).unsqueeze(1)
    for threshold in (0.0, 0.1, 0.25, 1.0):
        ours = off_policy_sequence_mask(adv, current, sampler, mask, threshold)
        theirs = GRPOTrainer.get_off_policy_mask(adv, current, sampler, mask, threshold)
        assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_correction_kl", [False, True])
def test_mask_and_bias_corrected_kl_match_trl(level, bias_correction_kl):
    g = torch.Generator().manual_seed(0)
    b, n = 5, 6
    logps = -torch.rand(b, n, generator=g, dtype=torch.float64) * 2
    old = logps + (torch.rand(b, n, generator=g, dtype=torch.float64) - 0.5) * 0.6
    sampler = old + (torch.rand(b, n, generator=g, dtype=torch.float64) - 0.2) * 0.8
    ref = logps + (torch.rand(b, n, generator=g, dtype=torch.float64) - 0.5)
    rho = torch.exp((torch.rand(b, n, generator=g, dtype=torch.float64) - 0.5) * 0.4)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 4:] = 0
    adv = t([1.0, -0.5, -0.7, -1.2, 0.4])
    inputs = {"prompt_ids": torch.ones(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.ones(b, n, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "sampling_per_token_logps": sampler,
              "importance_sampling_ratio": rho, "num_items_in_batch": mask.sum()}
    theirs_logps = logps.clone().requires_grad_()
    theirs, _ = trl_compute_loss(theirs_logps, torch.zeros_like(theirs_logps), inputs, loss_type="bnpo", beta=0.05,
                                 level=level, eps_low=0.2, eps_high=0.28, max_completion_length=8, sampler_correction=True,
                                 off_policy_mask_threshold=0.3, use_bias_correction_kl=bias_correction_kl)
    theirs.backward()
    ours_logps = logps.clone().requires_grad_()
    terms = policy_loss_terms(ours_logps, adv, mask, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo",
                              old_per_token_logps=old, importance_sampling_level=level, beta=0.05,
                              ref_per_token_logps=ref, sampler_weights=rho, sampler_logps=sampler,
                              off_policy_mask_threshold=0.3, bias_correction_kl=bias_correction_kl)
    ours = aggregate_loss(terms.per_token_loss, mask, "bnpo")
    ours.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours_logps.grad, theirs_logps.grad, atol=1e-12, rtol=0)
    assert 0 < terms.keep.sum() < b  # the mask drops some sequences and keeps others


def test_bias_corrected_kl_by_hand():
    # one token: log π = -1, old = -1.5 (r = e^0.5), ref = -1.2: Δ = -0.2, k3 = e^-0.2 + 0.2 - 1; advantage 0
    logps = t([[-1.0]]).requires_grad_()
    terms = policy_loss_terms(logps, t([0.0]), torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.2,
                              old_per_token_logps=t([[-1.5]]), beta=1.0, ref_per_token_logps=t([[-1.2]]),
                              bias_correction_kl=True)
    k3 = math.exp(-0.2) + 0.2 - 1
    assert terms.per_token_loss.item() == pytest.approx(k3 * math.exp(0.5), abs=1e-12)
    terms.per_token_loss.sum().backward()
    # d/dlogπ [k3(logπ)·r(logπ)] = (1 − e^Δ)·r + k3·r
    assert logps.grad.item() == pytest.approx((1 - math.exp(-0.2)) * math.exp(0.5) + k3 * math.exp(0.5), abs=1e-12)


# ---------------------------------------------------------------- replay buffer and re-rolls


def rollout(rewards, *, G=2, version=0, row_ids=None, sampler=True):
    """A rollout of len(rewards)/G prompts whose completion i is the token list [i] (so groups are traceable)."""
    n = len(rewards)
    P = n // G
    return Rollout(rows=[{"prompt": f"p{r}"} for r in (row_ids or range(P))], prompt_ids=[[7]] * n,
                   completion_ids=[[100 + i] for i in range(n)], loss_mask=[[1]] * n,
                   sampler_logps=[[-0.5]] * n if sampler else None, truncated=[False] * n,
                   texts=[f"c{i}" for i in range(n)], rewards=torch.tensor(rewards, dtype=torch.float32),
                   reward_names=[f"f{k}" for k in range(len(rewards[0]))], policy_version=version, num_generations=G,
                   row_ids=list(row_ids or range(P)))


def test_replay_scores_by_hand():
    # group 0: rewards (1, 0) on f0 and (0, 0) on f1 → std_f0 = 0.7071, std_f1 = 0; Σ|A| = |0.7| + |-0.7| = 1.4
    # group 1: all equal → 0
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    adv = torch.tensor([0.7, -0.7, 0.0, 0.0])
    s = replay_scores(rewards, adv, 2)
    assert s.tolist() == pytest.approx([1.4 * math.sqrt(0.5), 0.0], abs=1e-6)
    assert zero_signal_groups(rewards, 2) == [1]
    assert failed_groups(torch.tensor([[0.0], [0.0], [0.0], [1.0]]), 2) == [0]


def test_replay_replaces_zero_signal_groups_and_keeps_signal():
    buf = ReplayBuffer(capacity=2)
    first = rollout([[1.0], [0.0], [1.0], [1.0], [0.3], [0.0]], G=2, version=3, row_ids=[10, 11, 12])
    added = buf.add(first, torch.tensor([0.7, -0.7, 0.0, 0.0, 0.7, -0.7]), None, [True] * 3)
    assert added == 2 and [g.row_id for g in buf.groups] == [10, 12]  # group 11 had no signal
    assert [g.score for g in buf.groups] == pytest.approx([1.4 * math.sqrt(0.5), 1.4 * 0.3 * math.sqrt(0.5)], rel=1e-5)

    later = rollout([[0.0], [0.0], [1.0], [0.0]], G=2, version=5, row_ids=[20, 21])
    fresh = buf.replace_zero_signal(later, torch.Generator().manual_seed(0))
    assert fresh == [False, True]  # group 0 (all zero) replaced, group 1 kept
    assert later.row_ids[0] in (10, 12) and later.row_ids[1] == 21
    src = 0 if later.row_ids[0] == 10 else 4
    assert later.completion_ids[:2] == [[100 + src], [101 + src]]
    assert later.rewards[:2].squeeze(1).tolist() == first.rewards[src:src + 2].squeeze(1).tolist()
    assert later.completion_versions() == [3, 3, 5, 5]  # the replayed group keeps the version that sampled it
    assert len(buf) == 1  # a replayed group leaves the buffer


def test_replay_draws_in_proportion_to_score():
    counts = {10: 0, 12: 0}
    for seed in range(400):
        buf = ReplayBuffer(capacity=4)
        buf.add(rollout([[1.0], [0.0], [0.1], [0.0]], G=2, row_ids=[10, 12]), torch.tensor([1.0, -1.0, 1.0, -1.0]),
                None, [True, True])
        target = rollout([[0.0], [0.0]], G=2, row_ids=[30])
        buf.replace_zero_signal(target, torch.Generator().manual_seed(seed))
        counts[target.row_ids[0]] += 1
    # scores ∝ std: 0.7071 vs 0.07071 → P(10) = 10/11 ≈ 0.909; 400 draws: sd ≈ 0.014
    assert counts[10] / 400 == pytest.approx(10 / 11, abs=0.06)
    assert counts[12] > 0


def test_replay_capacity_drops_lowest_and_keeps_old_logps():
    buf = ReplayBuffer(capacity=1, keep_old_logps=True)
    r = rollout([[1.0], [0.0], [0.2], [0.0]], G=2, row_ids=[1, 2])
    old = torch.tensor([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0], [-4.0, 0.0]])
    buf.add(r, torch.tensor([1.0, -1.0, 1.0, -1.0]), old, [True, True])
    assert [g.row_id for g in buf.groups] == [1] and buf.groups[0].old_logps == [[-1.0], [-2.0]]
    target = rollout([[0.0], [0.0]], G=2, row_ids=[9])
    buf.replace_zero_signal(target, torch.Generator().manual_seed(0))
    assert target.old_logps == [[-1.0], [-2.0]]


def test_replay_needs_matching_sampler_logps():
    buf = ReplayBuffer(capacity=2)
    buf.add(rollout([[1.0], [0.0]], G=2, sampler=False), torch.tensor([1.0, -1.0]), None, [True])
    target = rollout([[0.0], [0.0]], G=2, row_ids=[5])
    assert buf.replace_zero_signal(target, torch.Generator().manual_seed(0)) == [True]


def test_reroll_buffers_failed_prompts_and_reinjects_them():
    rr = RerollBuffer(start_step=3, max_groups=1)
    assert rr.record(rollout([[0.0], [0.0], [1.0], [0.0], [0.0], [0.0]], G=2, row_ids=[4, 5, 6])) == 2
    assert rr.row_ids == [4, 6]
    assert rr.inject([1, 2, 3], step=2) == ([1, 2, 3], 0)  # before the start step: unchanged
    assert rr.inject([1, 2, 3], step=3) == ([1, 2, 4], 1)  # oldest first, in place of the last prompt
    assert rr.inject([6, 2, 3], step=4) == ([6, 2, 3], 0)  # 6 is already in this rollout
    assert rr.inject([1, 2, 3], step=5) == ([1, 2, 6], 1) and len(rr) == 0
    rr.record(rollout([[0.0], [0.0]], G=2, row_ids=[8]))
    rr.load_state_dict(rr.state_dict())
    assert rr.row_ids == [8]


# ---------------------------------------------------------------- prefetcher


def test_prefetcher_runs_jobs_in_a_thread_in_order():
    p = Prefetcher()
    names, gate = [], threading.Event()
    p.submit(0, lambda: (gate.wait(5), names.append(threading.current_thread().name), 0)[-1])
    p.submit(1, lambda: (names.append("second"), 1)[-1])
    assert p.in_flight()
    gate.set()
    assert p.take(0)[0] == 0 and p.take(1)[0] == 1
    assert names[0].startswith("reinforge-rollout") and names[1] == "second"
    p.submit(2, lambda: 1 / 0)
    p.submit(3, lambda: 3)
    assert p.drain() == {3: 3} and 2 not in p and 3 in p  # a failed job is dropped, to be produced again
    with pytest.raises(ZeroDivisionError):
        p.submit(4, lambda: 1 / 0)
        p.take(4)
    p.put(7, "saved")
    assert p.take(7)[0] == "saved"
    p.close()
