"""KTO: the loss and reference point by hand, the objective against TRL 1.16's KTOTrainer, the KL collator."""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from reinforge.algorithms import kto
from reinforge.data.collate import UnpairedCollator
from reinforge.training.objectives import KTOObjective

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kl_estimate_by_hand():
    # mismatched log-ratios 0.3 and −0.1 → mean 0.1
    assert kto.kl_estimate(t(-1.0, -2.0), t(-1.3, -1.9)).item() == pytest.approx(0.1)
    # negative mean is clamped to 0
    assert kto.kl_estimate(t(-2.0), t(-1.0)).item() == 0.0


def test_losses_by_hand():
    # desirable r = 0.5, undesirable r = −0.2; z₀ = 0.1, β = 2, λ_D = 1.0, λ_U = 1.5
    losses = kto.kto_losses(t(-1.0, -2.2), t(-1.5, -2.0), torch.tensor([True, False]), 0.1, 2.0, 1.0, 1.5)
    assert losses.tolist() == pytest.approx([1 - sig(2 * (0.5 - 0.1)), 1.5 * (1 - sig(2 * (0.1 + 0.2)))])


def test_weighting_advice():
    # 100 desirable vs 100: no advice; 300 vs 100 with weights 1/1: ratio 3 > 4/3
    assert kto.weighting_advice(100, 100, 1.0, 1.0) is None
    msg = kto.weighting_advice(300, 100, 1.0, 1.0)
    # λ_D ∈ [100/300, 4/3·100/300] = [0.333, 0.444]; λ_U ∈ [3·3/4, 3] = [2.25, 3]
    assert "kto_desirable_weight in [0.333, 0.444]" in msg and "kto_undesirable_weight in [2.25, 3]" in msg
    assert kto.weighting_advice(300, 100, 0.4, 1.0) is None  # 0.4·300/100 = 1.2 ∈ [1, 4/3]
    assert kto.weighting_advice(100, 300, 1.0, 1.0) is not None  # ratio 1/3


def test_objective_warning_counts_rows():
    obj = KTOObjective(beta=0.1)
    assert obj.weighting_advice([{"label": True}] * 3 + [{"label": False}]) is not None
    assert obj.weighting_advice([{"label": True}, {"label": False}]) is None


# ----------------------------------------------------------------------------------------------
# TRL 1.16 parity: KTOTrainer._compute_loss on a stand-in
# ----------------------------------------------------------------------------------------------

def _masks(g: torch.Generator, B: int, L: int) -> torch.Tensor:
    comp = torch.zeros(B, L, dtype=torch.long)
    for r in range(B):
        p = int(torch.randint(1, 4, (1,), generator=g))
        c = int(torch.randint(1, L - p + 1, (1,), generator=g))
        comp[r, p:p + c] = 1
    return comp


def _tok(g: torch.Generator, comp: torch.Tensor) -> torch.Tensor:
    return -torch.rand(comp.shape[0], comp.shape[1] - 1, generator=g, dtype=F64) * 3 * comp[:, 1:]


def _stub() -> torch.nn.Module:
    module = torch.nn.Module()
    module.is_gradient_checkpointing = False
    return module.train()


def trl_kto(labels, comp, kl_comp, pol, pol_kl, ref, ref_kl, beta, wd, wu):
    """TRL 1.16 KTOTrainer._compute_loss on a lightweight stand-in; returns (loss, metrics)."""
    from trl import KTOTrainer

    B, L = comp.shape
    ids, kl_ids = torch.zeros(B, L, dtype=torch.long), torch.ones(B, kl_comp.shape[1], dtype=torch.long)

    def fake_model(main, kl):
        def forward(**kwargs):
            per_token = kl if kwargs["input_ids"] is kl_ids else main
            z = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z)
        return forward

    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(
        model=_stub(), accelerator=acc, aux_loss_enabled=False, calculate_KL=True, precompute_ref_logps=False,
        ref_model=fake_model(ref, ref_kl), loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    fake._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, fake)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": comp,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_comp,
              "label": labels}
    loss = KTOTrainer._compute_loss(fake, fake_model(pol, pol_kl), inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


KTO_METRICS = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins")


@pytest.mark.parametrize("labels", [[True, False, True, False, False], [True, True, True, True, True],
                                    [False, False, True, False, False]])
@pytest.mark.parametrize("seed,ref_shift", [(0, 0.0), (1, 0.4), (2, -0.4)])
def test_matches_trl(labels, seed, ref_shift):
    g = torch.Generator().manual_seed(seed)
    B, L = len(labels), 10
    comp, kl_comp = _masks(g, B, L), _masks(g, B, L + 2)
    pol, pol_kl, ref, ref_kl = _tok(g, comp), _tok(g, kl_comp), _tok(g, comp), _tok(g, kl_comp)
    # shift the reference KL log-probs so that z₀ is positive in some cases and clamped in others
    ref_kl = ref_kl + ref_shift * kl_comp[:, 1:]
    labels_t = torch.tensor(labels)
    beta, wd, wu = 0.3, 1.0, 1.33
    trl_loss, trl_metrics = trl_kto(labels_t, comp, kl_comp, pol, pol_kl, ref, ref_kl, beta, wd, wu)

    objective = KTOObjective(beta=beta, desirable_weight=wd, undesirable_weight=wu)
    policy = {"logps": torch.cat([pol.sum(1), pol_kl.sum(1)])}
    batch = {"labels": labels_t, "n_tokens": torch.cat([comp[:, 1:].sum(1), kl_comp[:, 1:].sum(1)])}
    loss, metrics = objective(policy, torch.cat([ref.sum(1), ref_kl.sum(1)]), batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name in KTO_METRICS:
        if name in trl_metrics:
            assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name
        else:  # TRL logs nothing when the batch has no example of that class; ours is NaN (skipped when logged)
            assert math.isnan(metrics[name].item()), name


def test_kl_sequences_carry_no_gradient():
    objective = KTOObjective(beta=1.0)
    logps = torch.tensor([-1.0, -2.0, -1.5, -1.0], requires_grad=True)
    loss, _ = objective({"logps": logps}, torch.tensor([-1.2, -1.8, -2.0, -2.0]),
                        {"labels": torch.tensor([True, False])})
    loss.backward()
    assert logps.grad[2:].tolist() == [0.0, 0.0] and logps.grad[:2].abs().min() > 0


def test_objective_rejects_a_batch_without_kl_sequences():
    with pytest.raises(ValueError, match="mismatched KL"):
        KTOObjective(beta=0.1)({"logps": torch.zeros(2)}, torch.zeros(2), {"labels": torch.tensor([True, False])})


# ----------------------------------------------------------------------------------------------
# UnpairedCollator
# ----------------------------------------------------------------------------------------------

ROWS = [
    {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "label": True},
    {"prompt_ids": [7, 8], "completion_ids": [9], "label": False},
    {"prompt_ids": [11], "completion_ids": [12, 13, 14], "label": True},
]


def test_collator_sequence_order_by_hand():
    b = UnpairedCollator(pad_id=0)(ROWS)
    rows = [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert rows == [
        [1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14],        # examples
        [1, 2, 3, 12, 13, 14], [7, 8, 4, 5], [11, 9],         # prompt_i + completion_{i-1}
    ]
    assert b["n_tokens"].tolist() == [2, 1, 3, 3, 2, 1]
    assert b["labels"].tolist() == [True, False, True] and b["n_examples"] == 3
    # scored targets of the KL row 4 (prompt [7, 8]): positions 1..2 predict 4, 5
    assert b["targets"][4].tolist()[:4] == [-100, 4, 5, -100]


def test_collator_matches_trl_collator():
    """Same tensors as TRL 1.16's DataCollatorForUnpairedPreference given TRL's rotated KL completions."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    completions = [r["completion_ids"] for r in ROWS]
    rotated = [completions[-1]] + completions[:-1]  # TRL: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})
    trl = DataCollatorForUnpairedPreference(pad_token_id=0, max_length=5)(
        [{**r, "KL_completion_ids": c} for r, c in zip(ROWS, rotated)])
    ours = UnpairedCollator(pad_id=0, max_length=5)(ROWS)
    B = len(ROWS)
    for prefix, part in (("", slice(0, B)), ("KL_", slice(B, 2 * B))):
        mask = trl[f"{prefix}attention_mask"]
        width = mask.shape[1]
        assert torch.equal(ours["attention_mask"][part, :width], mask)
        assert torch.equal(ours["input_ids"][part, :width] * mask, trl[f"{prefix}input_ids"] * mask)
        # completion_mask[:, 1:] marks the positions whose next token is scored
        scored = ours["targets"][part, : width - 1] != -100
        assert torch.equal(scored, trl[f"{prefix}completion_mask"][:, 1:].bool())
    assert ours["labels"].tolist() == trl["label"].tolist()


def test_collator_errors():
    with pytest.raises(ValueError, match="bool `label`"):
        UnpairedCollator(0)([{**ROWS[0], "label": "yes"}, ROWS[1]])
    with pytest.raises(ValueError, match="precomputed reference"):
        UnpairedCollator(0)([{**r, "ref_logps": -1.0} for r in ROWS])


def test_mismatched_pairs_rotate_over_the_global_micro_batch():
    """Two processes holding ROWS[:2] and ROWS[2:] build the KL sequences one process builds from all of ROWS."""
    c = UnpairedCollator(pad_id=0)
    one = c(UnpairedCollator.with_global_batch(ROWS, ROWS, 0))
    assert all(torch.equal(one[k], c(ROWS)[k]) for k in ("input_ids", "targets", "n_tokens"))  # = in-batch rotation
    parts = [c(UnpairedCollator.with_global_batch(ROWS[:2], ROWS, 0)), c(UnpairedCollator.with_global_batch(ROWS[2:], ROWS, 2))]
    kl = [r[m.bool()].tolist() for p in parts for r, m in zip(p["input_ids"][p["n_examples"]:], p["attention_mask"][p["n_examples"]:])]
    assert kl == [[1, 2, 3, 12, 13, 14], [7, 8, 4, 5], [11, 9]]  # not [1, 2, 3, 9] and [11, 12, 13, 14] per process
    with pytest.raises(ValueError, match="not global_rows"):
        UnpairedCollator.with_global_batch(ROWS[2:], ROWS, 0)
