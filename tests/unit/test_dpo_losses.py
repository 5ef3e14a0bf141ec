"""DPO loss family: each loss against arithmetic done by hand here, and against TRL 1.16's DPOTrainer.

TRL's loss logic lives inside `DPOTrainer._compute_loss`; it is called on a `SimpleNamespace` that
carries the attributes the method reads, with stand-in models that return fixed per-token log-probs
(the shape and zero-padding of TRL's fused LM head output). Our side gets the same numbers as
`LogpsModel` would give them (per-token log-probs in row-major order, their sequence ids, sums).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from reinforge.algorithms import dpo
from reinforge.training.objectives import DPOObjective

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One pair: policy chosen −1.0, rejected −2.0; reference −1.5 for both. β = 0.5.
PC, PR, RC, RR = t(-1.0), t(-2.0), t(-1.5), t(-1.5)
ARGS = (PC, PR, RC, RR)
BETA = 0.5
# Log-ratios: chosen +0.5, rejected −0.5; margin h = 1.0; β·h = 0.5.


class TestByHand:
    def test_logits_and_rewards(self):
        assert dpo.dpo_logits(*ARGS).item() == pytest.approx(1.0)
        assert dpo.implicit_rewards(PC, RC, BETA).item() == pytest.approx(0.25)

    def test_sigmoid_and_cdpo(self):
        assert dpo.sigmoid_loss(*ARGS, BETA).item() == pytest.approx(-logsig(0.5))  # 0.474077
        eps = 0.1
        expected = -(1 - eps) * logsig(0.5) - eps * logsig(-0.5)
        assert dpo.sigmoid_loss(*ARGS, BETA, eps).item() == pytest.approx(expected)

    def test_hinge(self):
        assert dpo.hinge_loss(*ARGS, BETA).item() == pytest.approx(1 - 0.5)
        assert dpo.hinge_loss(*ARGS, 2.0).item() == 0.0  # 1 − 2·1 < 0

    def test_ipo_is_per_token(self):
        # chosen 4 tokens, rejected 2: (0.5/4 − (−0.5)/2 − 1/(2·0.5))² = (0.125 + 0.25 − 1)²
        got = dpo.ipo_loss(*ARGS, t(4), t(2), BETA).item()
        assert got == pytest.approx((0.125 + 0.25 - 1.0) ** 2)

    def test_exo_pair(self):
        eps = 1e-3
        q, ql = sig(0.5), sig(-0.5)
        expected = q * (math.log(q) - math.log(1 - eps)) + ql * (math.log(ql) - math.log(eps))
        assert dpo.exo_pair_loss(*ARGS, BETA, eps).item() == pytest.approx(expected)
        with pytest.raises(ValueError, match="exo_pair"):
            dpo.exo_pair_loss(*ARGS, BETA, 0.0)

    def test_nca_pair(self):
        # rewards 0.25 and −0.25
        expected = -logsig(0.25) - 0.5 * logsig(-0.25) - 0.5 * logsig(0.25)
        assert dpo.nca_pair_loss(*ARGS, BETA).item() == pytest.approx(expected)

    def test_robust(self):
        eps = 0.2
        expected = (-(1 - eps) * logsig(0.5) + eps * logsig(-0.5)) / (1 - 2 * eps)
        assert dpo.robust_loss(*ARGS, BETA, eps).item() == pytest.approx(expected)
        assert dpo.robust_loss(*ARGS, BETA, 0.0).item() == pytest.approx(-logsig(0.5))

    def test_bco_pair(self):
        assert dpo.bco_pair_loss(*ARGS, BETA).item() == pytest.approx(-logsig(0.25) - logsig(0.25))
        # δ = 0.1: −log σ(0.25 − 0.1) − log σ(−(−0.25 − 0.1))
        assert dpo.bco_pair_loss(*ARGS, BETA, 0.1).item() == pytest.approx(-logsig(0.15) - logsig(0.35))

    def test_sppo_hard(self):
        # (0.5 − 1)² + (−0.5 + 1)²
        assert dpo.sppo_hard_loss(*ARGS, BETA).item() == pytest.approx(0.25 + 0.25)

    def test_aot_sorts_the_batch(self):
        pc, pr, rc, rr = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.0, -1.0), t(-1.0, -2.0)
        # policy margins [1, −2] → sorted [−2, 1]; reference margins [0, 1] → sorted [0, 1]; deltas [−2, 0]
        got = dpo.aot_loss(pc, pr, rc, rr, 1.0).tolist()
        assert got == pytest.approx([-logsig(-2.0), -logsig(0.0)])
        # unpaired: chosen ratios [0, −2] → [−2, 0]; rejected ratios [−1, 1] → [−1, 1]; deltas [−1, −1]
        got = dpo.aot_unpaired_loss(pc, pr, rc, rr, 1.0).tolist()
        assert got == pytest.approx([-logsig(-1.0), -logsig(-1.0)])

    def test_apo(self):
        assert dpo.apo_zero_loss(*ARGS, BETA).item() == pytest.approx((1 - sig(0.25)) + sig(-0.25))
        assert dpo.apo_down_loss(*ARGS, BETA).item() == pytest.approx(sig(0.25) + (1 - sig(0.5)))

    def test_discopop(self):
        z, tau = 0.5, 0.05
        m = sig(z / tau)
        expected = -logsig(z) * (1 - m) + math.exp(-z) * m
        assert dpo.discopop_loss(*ARGS, BETA, tau).item() == pytest.approx(expected)

    def test_sigmoid_norm(self):
        # (0.5/4 − (−0.5)/2) = 0.375
        assert dpo.sigmoid_norm_loss(*ARGS, t(4), t(2), BETA).item() == pytest.approx(-logsig(0.5 * 0.375))

    def test_chosen_nll_weighs_tokens(self):
        # −(−2 − 6) / (2 + 6) = 1.0, not the mean of per-sequence means (1 and 1 → also 1; use uneven)
        assert dpo.chosen_nll(t(-2.0, -3.0), t(2, 6)).item() == pytest.approx(5 / 8)

    def test_preference_loss_weighted_sum(self):
        loss, parts = dpo.preference_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], *ARGS, t(4), t(2), BETA)
        expected = 0.8 * -logsig(0.5) + 0.2 * (-2 * logsig(0.25)) + 1.0 * (1.0 / 4)
        assert loss.item() == pytest.approx(expected)
        assert set(parts) == {"sigmoid", "bco_pair", "sft"}

    def test_preference_loss_pair_weights_and_alias(self):
        loss, parts = dpo.preference_loss(["aot_pair"], [2.0], *ARGS, t(1), t(1), BETA, pair_weights=t(0.5))
        assert "aot_unpaired" in parts
        assert loss.item() == pytest.approx(2.0 * 0.5 * -logsig(0.5))
        with pytest.raises(ValueError, match="unknown DPO loss type 'nope'"):
            dpo.preference_loss(["nope"], [1.0], *ARGS, t(1), t(1), BETA)

    def test_ld_logps(self):
        # chosen: 3 tokens [−1, −2, −3]; rejected: 1 token [−4]; shared length 1, α = 0.5
        tok = t(-1, -2, -3, -4)
        seq = torch.tensor([0, 0, 0, 1])
        got = dpo.ld_logps(tok, seq, torch.tensor([3, 1]), 0.5).tolist()
        assert got == pytest.approx([-1 + 0.5 * (-2 - 3), -4.0])
        assert dpo.sequence_positions(torch.tensor([0, 0, 1, 0, 1]), 2).tolist() == [1, 2, 1, 3, 2]

    def test_wpo_weights(self):
        tok, lssp = t(-1.0, -2.0, -0.5), t(-0.5, -1.0, -0.25)
        seq, n = torch.tensor([0, 0, 1]), torch.tensor([2, 1])
        # seq 0: mean(−0.5, −1.0) = −0.75; seq 1: −0.25
        assert dpo.wpo_weights(tok, lssp, seq, n).tolist() == pytest.approx([math.exp(-0.75), math.exp(-0.25)])


# ----------------------------------------------------------------------------------------------
# TRL 1.16 parity
# ----------------------------------------------------------------------------------------------

def _batch(seed: int, B: int = 3, L: int = 9):
    """Random per-token log-probs for 2B sequences of length L with prompts/completions of varied length."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.zeros(2 * B, L, dtype=torch.long)
    for r in range(2 * B):
        p = int(torch.randint(1, 4, (1,), generator=g))
        c = int(torch.randint(1, L - p + 1, (1,), generator=g))
        comp[r, p:p + c] = 1
    shift = comp[:, 1:].bool()

    def tok() -> torch.Tensor:
        return (-torch.rand(2 * B, L - 1, generator=g, dtype=F64) * 3) * shift

    lssp = (-torch.rand(2 * B, L - 1, generator=g, dtype=F64) * 2) * shift
    return comp, tok(), tok(), lssp


def _ours(per_token: torch.Tensor, comp: torch.Tensor, lssp: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    shift = comp[:, 1:].bool()
    seq = torch.arange(comp.shape[0]).unsqueeze(1).expand_as(shift)[shift]
    out = {"token_logps": per_token[shift], "token_seq": seq, "logps": per_token.sum(1)}
    if lssp is not None:
        out["token_log_sum_sq_probs"] = lssp[shift]
    return out


def _policy_stub() -> torch.nn.Module:
    """What TRL inspects on `self.model`: an nn.Module in training mode without gradient checkpointing."""
    module = torch.nn.Module()
    module.is_gradient_checkpointing = False
    return module.train()


def trl_dpo(comp, pol, ref, lssp, loss_types, loss_weights, beta, label_smoothing=0.0, ld_alpha=None,
            use_weighting=False, discopop_tau=0.05):
    """TRL 1.16 DPOTrainer._compute_loss on a lightweight stand-in; returns (loss, metrics)."""
    from trl import DPOTrainer

    n = comp.shape[0]
    zeros = torch.zeros_like(pol)

    def policy_model(**kwargs):
        return SimpleNamespace(log_probs=pol, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=lssp)

    def ref_model(**kwargs):
        return SimpleNamespace(log_probs=ref)

    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(
        model=_policy_stub(), accelerator=acc,
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=False, ref_model=ref_model,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=discopop_tau),
        f_divergence_type="reverse_kl", loss_types=list(loss_types), loss_weights=list(loss_weights), beta=beta,
        label_smoothing=label_smoothing, use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, comp.shape[1], dtype=torch.long),
              "attention_mask": torch.ones(n, comp.shape[1], dtype=torch.long), "completion_mask": comp}
    loss = DPOTrainer._compute_loss(fake, policy_model, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")

CASES = [
    (["sigmoid"], [1.0], {}),
    (["hinge"], [1.0], {}),
    (["ipo"], [1.0], {}),
    (["exo_pair"], [1.0], {"label_smoothing": 1e-3}),
    (["nca_pair"], [1.0], {}),
    (["robust"], [1.0], {"label_smoothing": 0.1}),
    (["bco_pair"], [1.0], {}),
    (["sppo_hard"], [1.0], {}),
    (["aot"], [1.0], {"label_smoothing": 0.05}),
    (["aot_unpaired"], [1.0], {"label_smoothing": 0.05}),
    (["apo_zero"], [1.0], {}),
    (["apo_down"], [1.0], {}),
    (["discopop"], [1.0], {"discopop_tau": 0.1}),
    (["sft"], [1.0], {}),
    (["sigmoid_norm"], [1.0], {}),
    # multi-loss weighted sums: MPO, and a mixture exercising every length convention at once
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
    (["ipo", "sigmoid_norm", "sft", "hinge"], [0.3, 1.5, 0.7, 0.25], {}),
    # LD-DPO and WPO, alone and with the MPO mixture
    (["sigmoid"], [1.0], {"ld_alpha": 0.3}),
    # (TRL 1.16 cannot combine `sft` with use_weighting: it scales the expanded sft tensor in place and fails)
    (["sigmoid", "bco_pair", "apo_down"], [0.8, 0.2, 1.0], {"ld_alpha": 0.5, "use_weighting": True}),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"ld_alpha": 0.5}),
    (["ipo", "apo_zero"], [1.0, 0.5], {"use_weighting": True}),
]


@pytest.mark.parametrize("loss_types,weights,kw", CASES, ids=["+".join(c[0]) + ("/" + ",".join(c[2]) if c[2] else "")
                                                               for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl(loss_types, weights, kw, seed):
    comp, pol, ref, lssp = _batch(seed)
    beta = 0.3
    trl_loss, trl_metrics = trl_dpo(comp, pol, ref, lssp, loss_types, weights, beta, **kw)
    objective = DPOObjective(
        beta=beta, label_smoothing=kw.get("label_smoothing", 0.0), loss_types=tuple(loss_types),
        loss_weights=tuple(weights), ld_alpha=kw.get("ld_alpha"), use_weighting=kw.get("use_weighting", False),
        discopop_tau=kw.get("discopop_tau", 0.05), bco_running_mean=False)  # TRL 1.16: δ = 0
    batch = {"n_pairs": comp.shape[0] // 2, "n_tokens": comp[:, 1:].sum(1)}
    ref_arg = _ours(ref, comp) if kw.get("ld_alpha") is not None else ref.sum(1)
    loss, metrics = objective(_ours(pol, comp, lssp), ref_arg, batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name in METRICS:
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name


def test_rpo_alpha_is_trl_sigmoid_plus_weighted_sft():
    comp, pol, ref, lssp = _batch(3)
    trl_loss, _ = trl_dpo(comp, pol, ref, lssp, ["sigmoid", "sft"], [1.0, 0.4], 0.1)
    objective = DPOObjective(beta=0.1, rpo_alpha=0.4)
    batch = {"n_pairs": comp.shape[0] // 2, "n_tokens": comp[:, 1:].sum(1)}
    loss, metrics = objective(_ours(pol, comp), ref.sum(1), batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert "nll_loss" in metrics


def test_pure_functions_match_trl_per_type():
    """`preference_loss` alone (the pure function, on sums and lengths) equals TRL for every single type."""
    comp, pol, ref, lssp = _batch(5, B=4)
    B = comp.shape[0] // 2
    lengths = comp[:, 1:].sum(1).to(F64)
    sums, ref_sums = pol.sum(1), ref.sum(1)
    for name in dpo.LOSS_TYPES:
        ls = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(name, 0.0)
        trl_loss, _ = trl_dpo(comp, pol, ref, lssp, [name], [1.0], 0.7, label_smoothing=ls)
        ours, _ = dpo.preference_loss([name], [1.0], sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], lengths[:B],
                                      lengths[B:], 0.7, label_smoothing=ls)
        assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6), name


def test_ld_alpha_needs_reference_tokens():
    comp, pol, ref, _ = _batch(0)
    objective = DPOObjective(beta=0.1, ld_alpha=0.5)
    assert objective.needs_reference_tokens
    with pytest.raises(ValueError, match="per-token"):
        objective(_ours(pol, comp), ref.sum(1), {"n_pairs": 3, "n_tokens": comp[:, 1:].sum(1)})


def test_wpo_needs_log_sum_sq_probs():
    comp, pol, ref, _ = _batch(0)
    objective = DPOObjective(beta=0.1, use_weighting=True)
    with pytest.raises(ValueError, match="token_log_sum_sq_probs"):
        objective(_ours(pol, comp), ref.sum(1), {"n_pairs": 3, "n_tokens": comp[:, 1:].sum(1)})


def test_bco_running_mean_state():
    """δ is the mean of every reward seen in training so far, updated before use; evaluation leaves it alone."""
    objective = DPOObjective(beta=1.0, loss_types=("bco_pair",), loss_weights=(1.0,))
    batch = {"n_pairs": 1, "n_tokens": torch.tensor([1, 1])}
    # step 1: chosen log-ratio 1.0, rejected 0.0 (β = 1) → δ = mean(1.0, 0.0) = 0.5
    pol = {"logps": t(-1.0, -2.0)}
    loss1, _ = objective(pol, t(-2.0, -2.0), batch)
    assert objective.bco_state.mean == pytest.approx(0.5)
    assert loss1.item() == pytest.approx(-logsig(1.0 - 0.5) - logsig(-(0.0 - 0.5)))
    # step 2: ratios 3.0 and 1.0 → δ = (1 + 0 + 3 + 1)/4 = 1.25
    loss2, _ = objective({"logps": t(0.0, -1.0)}, t(-3.0, -2.0), batch)
    assert objective.bco_state.mean == pytest.approx(1.25)
    assert loss2.item() == pytest.approx(-logsig(3.0 - 1.25) - logsig(-(1.0 - 1.25)))
    with torch.no_grad():
        objective({"logps": t(5.0, 5.0)}, t(0.0, 0.0), batch)
    assert objective.bco_state.mean == pytest.approx(1.25)
