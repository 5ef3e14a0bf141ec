"""Advantages (GRPO group-relative, scale_rewards modes, GDPO) against hand-computed values and
against TRL 1.16's GRPOTrainer._generate_and_score_completions run on a lightweight stand-in."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from reinforge.algorithms.advantages import (
    compute_advantages,
    gdpo_advantages,
    group_relative_advantages,
    nanstd,
    normalize_scale_rewards,
    reward_metrics,
    weighted_reward_sum,
)

EPS = 1e-4
NAN = float("nan")


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed values


def test_nanstd_is_bessel_corrected_and_skips_nan():
    # [1, 3, nan]: mean 2, squared deviations 1 + 1 = 2, divided by n-1 = 1 → std sqrt(2)
    assert nanstd(t([1.0, 3.0, NAN])).item() == pytest.approx(math.sqrt(2.0))
    # one value left: NaN (as torch.std)
    assert math.isnan(nanstd(t([5.0, NAN])).item())
    rows = nanstd(t([[0.0, 2.0], [NAN, 4.0]]), dim=1)
    assert rows[0].item() == pytest.approx(math.sqrt(2.0)) and math.isnan(rows[1].item())


def test_group_scaling_by_hand():
    # group 1: [1, 0, 0.5], mean 0.5, deviations (0.5, -0.5, 0), var (0.25+0.25)/2 = 0.25, std 0.5
    # group 2: [2, 2, 2], std 0 → advantages 0 / (0 + 1e-4) = 0
    res = group_relative_advantages(t([1.0, 0.0, 0.5, 2.0, 2.0, 2.0]), num_generations=3, scale_rewards="group")
    a = 0.5 / (0.5 + EPS)
    assert res.advantages.tolist() == pytest.approx([a, -a, 0.0, 0.0, 0.0, 0.0], abs=1e-12)
    assert res.std.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0, 0.0, 0.0])


def test_batch_scaling_by_hand():
    # batch mean 7.5/6 = 1.25; deviations (-0.25, -1.25, -0.75, 0.75, 0.75, 0.75)
    # squares 0.0625 + 1.5625 + 0.5625 + 3·0.5625 = 3.875; var 3.875/5 = 0.775
    # the baseline stays the group mean (0.5 and 2)
    r = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]
    res = group_relative_advantages(t(r), num_generations=3, scale_rewards="batch")
    s = math.sqrt(0.775)
    expected = [(1 - 0.5) / (s + EPS), (0 - 0.5) / (s + EPS), 0.0, 0.0, 0.0, 0.0]
    assert res.advantages.tolist() == pytest.approx(expected, abs=1e-12)
    assert res.std.tolist() == pytest.approx([s] * 6)


def test_no_scaling_by_hand_and_bool_aliases():
    r = t([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    res = group_relative_advantages(r, num_generations=3, scale_rewards="none")
    assert res.advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(group_relative_advantages(r, 3, False).advantages, res.advantages)
    assert torch.equal(group_relative_advantages(r, 3, True).advantages,
                       group_relative_advantages(r, 3, "group").advantages)
    assert normalize_scale_rewards(True) == "group" and normalize_scale_rewards(False) == "none"
    with pytest.raises(ValueError, match="scale_rewards"):
        normalize_scale_rewards("grop")


def test_nan_rewards_by_hand():
    # weights (1, 0.5); rows: (1, nan) → 1; (0, 1) → 0.5; (nan, nan) → unscorable; (1, 1) → 1.5
    rpf = t([[1.0, NAN], [0.0, 1.0], [NAN, NAN], [1.0, 1.0]])
    w = t([1.0, 0.5])
    summed = weighted_reward_sum(rpf, w)
    assert summed[:2].tolist() == [1.0, 0.5] and math.isnan(summed[2].item()) and summed[3].item() == 1.5
    res = compute_advantages(rpf, w, num_generations=2, scale_rewards="group")
    # group 1: mean 0.75, deviations ±0.25, var 0.125/1 → std sqrt(0.125)
    a = 0.25 / (math.sqrt(0.125) + EPS)
    # group 2: one scorable value → std NaN → advantage 0; the unscorable row gets 0
    assert res.advantages.tolist() == pytest.approx([a, -a, 0.0, 0.0], abs=1e-12)


def test_gdpo_by_hand_paper_example():
    # GDPO paper (arXiv 2601.05242, §3) example: two binary rewards, two rollouts per prompt.
    # Prompt A rollouts score (0,0) and (0,1): totals 0, 1. Prompt B: (0,0) and (1,1): totals 0, 2.
    rpf = t([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    w = t([1.0, 1.0])
    # GRPO (sum, then group-normalise): [0,1] → ±0.5/(sqrt(0.5)+eps); [0,2] → ±1/(sqrt(2)+eps):
    # both ≈ ±0.7071 — the two different reward combinations collapse to the same advantage.
    grpo = compute_advantages(rpf, w, 2, "group", "sum_then_normalize").advantages
    g1, g2 = 0.5 / (math.sqrt(0.5) + EPS), 1.0 / (math.sqrt(2.0) + EPS)
    assert grpo.tolist() == pytest.approx([-g1, g1, -g2, g2], abs=1e-12)
    assert grpo[1].item() == pytest.approx(grpo[3].item(), abs=1e-3)
    # GDPO: each reward normalised in its group: a = 0.5/(sqrt(0.5)+eps) for a [0,1] column, 0 for a
    # constant column; prompt A sums to (-a, a), prompt B to (-2a, 2a); batch mean 0, batch std
    # sqrt((a²+a²+4a²+4a²)/3) = a·sqrt(10/3).
    a = 0.5 / (math.sqrt(0.5) + EPS)
    s = a * math.sqrt(10.0 / 3.0)
    gdpo = gdpo_advantages(rpf, w, 2)
    assert gdpo.advantages.tolist() == pytest.approx([-a / (s + EPS), a / (s + EPS), -2 * a / (s + EPS), 2 * a / (s + EPS)],
                                                     abs=1e-12)
    assert gdpo.advantages[3].item() == pytest.approx(2 * gdpo.advantages[1].item(), rel=1e-9)


def test_gdpo_separates_what_grpo_collapses_groups_of_four():
    w = t([1.0, 1.0])
    # group A: (1,0),(0,0),(1,0),(0,0): totals 1,0,1,0. group B: (1,1),(0,0),(1,1),(0,0): totals 2,0,2,0.
    # GRPO: a 0/1 or 0/2 pattern normalises to the same ±0.866 (std is scale-invariant) → equal.
    rpf = t([[1, 0], [0, 0], [1, 0], [0, 0], [1, 1], [0, 0], [1, 1], [0, 0]])
    grpo = compute_advantages(rpf, w, 4, "group", "sum_then_normalize").advantages
    assert grpo[:4].tolist() == pytest.approx(grpo[4:].tolist(), abs=1e-3)
    assert grpo[0].item() == pytest.approx(0.5 / math.sqrt(1 / 3), abs=1e-3)
    # GDPO: group B satisfies both rewards, so its advantages are twice group A's.
    gdpo = compute_advantages(rpf, w, 4, "group", "normalize_then_sum").advantages
    assert gdpo[4].item() == pytest.approx(2 * gdpo[0].item(), rel=1e-9)
    assert abs(gdpo[4].item() - gdpo[0].item()) > 0.5
    # The split (1,0),(0,1),(1,0),(0,1): every total is 1, so GRPO gives 0 everywhere; under GDPO with
    # equal weights the two normalised columns are exact opposites (±b and ∓b) and also sum to 0.
    # Equal totals from *different splits* within one group are not separated by GDPO either.
    split = t([[1, 0], [0, 1], [1, 0], [0, 1]])
    assert compute_advantages(split, w, 4, "group", "sum_then_normalize").advantages.abs().max().item() == 0.0
    assert compute_advantages(split, w, 4, "group", "normalize_then_sum").advantages.abs().max().item() < 1e-12


def test_errors():
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        group_relative_advantages(t([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="reward_weights"):
        compute_advantages(t([[1.0, 2.0]]), t([1.0]), 1)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        compute_advantages(t([[1.0], [2.0]]), t([1.0]), 2, "group", "sum")


# ---------------------------------------------------------------- against TRL 1.16


def _trl_generate_and_score(rewards_per_func, weights, num_generations, scale_rewards, aggregation):
    """Run TRL's real GRPOTrainer._generate_and_score_completions on a stand-in object that carries
    only the attributes the method reads; generation and reward calls are stubbed out, so the
    method's own advantage computation runs on `rewards_per_func`."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    n, k = rewards_per_func.shape
    ns = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, process_index=0, num_processes=1),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, environments=None, tools=None,
        _generate=lambda prompts: ([[5]] * n, [[1, 2]] * n, None, ["c"] * n, None, None, None, None),
        _tokenizer=types.SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=types.SimpleNamespace(per_device_train_batch_size=n, steps_per_generation=1, gradient_accumulation_steps=1,
                                   gradient_checkpointing_kwargs=None),
        num_iterations=1, use_vllm=False, beta=0.0,
        _calculate_rewards=lambda inputs, prompts, completions, ids: rewards_per_func.clone(),
        num_generations=num_generations, multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
        reward_weights=weights.clone(), reward_func_names=[f"f{i}" for i in range(k)], reward_funcs=[None] * k,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
    )
    out = GRPOTrainer._generate_and_score_completions(ns, [{"prompt": "p"} for _ in range(n)])
    return out["advantages"], {name: values[0] for name, values in ns._metrics["train"].items()}


REWARDS = t([
    [1.0, 0.2, NAN], [0.0, 0.7, 1.0], [1.0, NAN, 0.0], [0.0, 0.1, 1.0],   # group 1
    [NAN, NAN, NAN], [1.0, 0.9, 0.5], [1.0, 0.3, NAN], [0.0, 0.3, 0.5],   # group 2 (one unscorable)
    [1.0, 0.5, 1.0], [1.0, 0.5, 1.0], [1.0, 0.5, 1.0], [1.0, 0.5, 1.0],   # group 3 (zero std)
])
WEIGHTS = t([1.0, 0.5, 2.0])


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_trl(aggregation, scale):
    trl_adv, trl_metrics = _trl_generate_and_score(REWARDS, WEIGHTS, 4, scale, aggregation)
    ours = compute_advantages(REWARDS, WEIGHTS, 4, scale, aggregation)
    torch.testing.assert_close(ours.advantages, trl_adv.to(torch.float64), atol=1e-6, rtol=0)
    metrics = reward_metrics(REWARDS, WEIGHTS, ours.std, ["f0", "f1", "f2"])
    assert set(metrics) == set(trl_metrics)
    for name, value in trl_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name


def test_matches_trl_random_groups():
    gen = torch.Generator().manual_seed(0)
    rpf = torch.rand(24, 2, generator=gen, dtype=torch.float64)
    rpf[torch.rand(24, 2, generator=gen) < 0.2] = NAN
    w = t([0.7, 1.3])
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        for g in (2, 3, 6):
            trl_adv, _ = _trl_generate_and_score(rpf, w, g, "group", aggregation)
            ours = compute_advantages(rpf, w, g, "group", aggregation).advantages
            torch.testing.assert_close(ours, trl_adv.to(torch.float64), atol=1e-6, rtol=0)
