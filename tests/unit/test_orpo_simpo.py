"""ORPO, SimPO and CPO: by hand, and against TRL 1.16's (experimental) ORPOTrainer / CPOTrainer.

TRL's loss code runs as its trainer methods bound to a `SimpleNamespace` carrying the attributes they
read, with a stand-in model returning fixed float64 logits. Our objectives get the log-probs of the same
logits in the form `LogpsModel` produces (per-token log-probs of the completion tokens, their sequence
ids, per-sequence sums).
"""

from __future__ import annotations

import math
import os
from types import MethodType, SimpleNamespace

import pytest
import torch

from reinforge.algorithms import dpo, orpo, simpo
from reinforge.training.objectives import ORPOObjective, SimPOObjective

F64 = torch.float64
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------------
# by hand
# ----------------------------------------------------------------------------------------------

def test_log1mexp():
    for x in (-1e-8, -0.1, -0.6931, -0.7, -5.0, -40.0):
        assert orpo.log1mexp(t(x)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)
    assert orpo.log1mexp(t(-1e-10)).item() == pytest.approx(math.log(1e-10), rel=1e-6)  # no cancellation


def test_orpo_by_hand():
    # mean log-probs: chosen log 0.5, rejected log 0.25 → odds 1 and 1/3 → log OR = log 3
    lc, lr = math.log(0.5), math.log(0.25)
    log_odds = orpo.log_odds_ratio(t(lc), t(lr)).item()
    assert log_odds == pytest.approx(math.log(3.0))
    loss, lo, ratio = orpo.orpo_loss(t(lc), t(lr), t(2.0), 0.1)
    assert ratio.item() == pytest.approx(logsig(math.log(3.0)))  # log σ(log 3) = log(3/4)
    assert ratio.item() == pytest.approx(math.log(0.75))
    assert loss.item() == pytest.approx(2.0 - 0.1 * math.log(0.75))


def test_simpo_and_cpo_by_hand():
    # SimPO: β = 2, γ = 0.5, mean log-probs −1.0 and −1.5: −log σ(2·0.5 − 0.5)
    assert simpo.simpo_loss(t(-1.0), t(-1.5), 2.0, 0.5).item() == pytest.approx(-logsig(0.5))
    eps = 0.1
    assert simpo.simpo_loss(t(-1.0), t(-1.5), 2.0, 0.5, eps).item() == pytest.approx(
        -(1 - eps) * logsig(0.5) - eps * logsig(-0.5))
    # CPO: β = 0.1 on sums −10 and −14: −log σ(0.4)
    assert simpo.cpo_loss(t(-10.0), t(-14.0), 0.1).item() == pytest.approx(-logsig(0.4))


def test_objectives_by_hand():
    # one pair, chosen 2 tokens summing −2 (mean −1), rejected 4 tokens summing −6 (mean −1.5)
    policy = {"logps": t(-2.0, -6.0)}
    batch = {"n_pairs": 1, "n_tokens": torch.tensor([2, 4])}
    loss, m = SimPOObjective(beta=2.0, gamma=0.5, cpo_alpha=0.3)(policy, None, batch)
    assert loss.item() == pytest.approx(-logsig(0.5) + 0.3 * 1.0)  # NLL per chosen token = 1.0
    assert m["rewards/chosen"].item() == pytest.approx(-2.0) and m["logps/rejected"].item() == pytest.approx(-1.5)
    assert m["rewards/accuracies"].item() == 1.0 and m["nll_loss"].item() == pytest.approx(1.0)
    loss, m = ORPOObjective(alpha=0.2)(policy, None, batch)
    lo = (-1.0 + 1.5) - (math.log(1 - math.exp(-1.0)) - math.log(1 - math.exp(-1.5)))
    assert m["log_odds_chosen"].item() == pytest.approx(lo)
    assert loss.item() == pytest.approx(1.0 - 0.2 * logsig(lo))
    assert m["rewards/margins"].item() == pytest.approx(0.2 * 0.5)


# ----------------------------------------------------------------------------------------------
# TRL 1.16 parity
# ----------------------------------------------------------------------------------------------

def _pairs(seed: int, B: int, L: int, V: int, prompt_len: int | None):
    """Token ids, labels (prompt and padding −100) and logits for 2B sequences [chosen..., rejected...]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * B, L), generator=g)
    attention = torch.zeros(2 * B, L, dtype=torch.long)
    labels = torch.full((2 * B, L), -100)
    for r in range(2 * B):
        p = prompt_len or int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(p + 1, L + 1, (1,), generator=g))
        attention[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
        ids[r, n:] = 0
    logits = torch.randn(2 * B, L, V, generator=g, dtype=F64) * 2
    return ids, attention, labels, logits


def _ours(ids, labels, logits):
    """What LogpsModel returns for these logits: per-token log-probs of the scored tokens, seq ids, sums."""
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(mask)[mask]
    policy = {"token_logps": logp[mask], "token_seq": seq, "logps": (logp * mask).sum(1)}
    return policy, {"n_pairs": ids.shape[0] // 2, "n_tokens": mask.sum(1)}


def _trl_batch(ids, attention, labels):
    B = ids.shape[0] // 2
    return {"chosen_input_ids": ids[:B], "chosen_attention_mask": attention[:B], "chosen_labels": labels[:B],
            "rejected_input_ids": ids[B:], "rejected_attention_mask": attention[B:], "rejected_labels": labels[B:]}


def _fake_model(logits):
    return lambda input_ids, attention_mask=None, use_cache=None, **kw: SimpleNamespace(logits=logits)


ACC = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss")


def trl_orpo(ids, attention, labels, logits, beta):
    from trl.experimental.orpo import ORPOTrainer

    fake = SimpleNamespace(beta=beta, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
                           accelerator=ACC, concatenated_inputs=ORPOTrainer.concatenated_inputs,
                           get_batch_logps=ORPOTrainer.get_batch_logps)
    fake.concatenated_forward = MethodType(ORPOTrainer.concatenated_forward, fake)
    fake.odds_ratio_loss = MethodType(ORPOTrainer.odds_ratio_loss, fake)
    return ORPOTrainer.get_batch_loss_metrics(fake, _fake_model(logits), _trl_batch(ids, attention, labels))


def trl_cpo(ids, attention, labels, logits, beta, gamma, cpo_alpha, loss_type="simpo", label_smoothing=0.0):
    from trl.experimental.cpo import CPOTrainer

    fake = SimpleNamespace(beta=beta, simpo_gamma=gamma, cpo_alpha=cpo_alpha, loss_type=loss_type, alpha=0.0,
                           label_smoothing=label_smoothing, is_encoder_decoder=False, pad_token_id=0,
                           aux_loss_enabled=False, accelerator=ACC, concatenated_inputs=CPOTrainer.concatenated_inputs,
                           get_batch_logps=CPOTrainer.get_batch_logps)
    fake.concatenated_forward = MethodType(CPOTrainer.concatenated_forward, fake)
    fake.cpo_loss = MethodType(CPOTrainer.cpo_loss, fake)
    return fake, CPOTrainer.get_batch_loss_metrics(fake, _fake_model(logits), _trl_batch(ids, attention, labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_orpo_matches_trl(seed, alpha):
    # Prompts of one token: TRL's ORPO NLL runs over prompt + completion, ours over the completion only;
    # a one-token prompt is never predicted, so both count exactly the completion tokens here.
    ids, attention, labels, logits = _pairs(seed, B=3, L=8, V=11, prompt_len=1)
    trl_loss, trl_metrics = trl_orpo(ids, attention, labels, logits, alpha)
    policy, batch = _ours(ids, labels, logits)
    loss, metrics = ORPOObjective(alpha=alpha)(policy, None, batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name in PAIR_METRICS + ("log_odds_ratio", "log_odds_chosen"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name


def test_orpo_pure_function_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(7)
    chosen, rejected = -torch.rand(6, generator=g, dtype=F64) * 4, -torch.rand(6, generator=g, dtype=F64) * 4
    fake = SimpleNamespace(beta=0.25, accelerator=ACC)
    losses, _, _, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    loss, log_odds, ratio = orpo.orpo_loss(chosen, rejected, torch.zeros((), dtype=F64), 0.25)
    assert loss.item() == pytest.approx(-losses.mean().item(), abs=1e-6)
    assert log_odds.mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-6)
    assert ratio.mean().item() == pytest.approx(trl_ratio.item(), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,gamma,cpo_alpha", [(2.0, 0.5, 0.0), (2.5, 1.0, 1.0), (0.5, 0.0, 0.3)])
def test_simpo_matches_trl_cpo_trainer(seed, beta, gamma, cpo_alpha):
    ids, attention, labels, logits = _pairs(seed, B=3, L=9, V=13, prompt_len=None)
    _, (trl_loss, trl_metrics) = trl_cpo(ids, attention, labels, logits, beta, gamma, cpo_alpha)
    policy, batch = _ours(ids, labels, logits)
    loss, metrics = SimPOObjective(beta=beta, gamma=gamma, cpo_alpha=cpo_alpha)(policy, None, batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    names = PAIR_METRICS if cpo_alpha else PAIR_METRICS[:-1]  # TRL logs nll_loss = 0 when cpo_alpha = 0
    for name in names:
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-6), name


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid"])
def test_pure_functions_match_trl_cpo_loss(loss_type):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    chosen, rejected = -torch.rand(5, generator=g, dtype=F64) * 6, -torch.rand(5, generator=g, dtype=F64) * 6
    fake = SimpleNamespace(beta=0.7, simpo_gamma=0.4, loss_type=loss_type, alpha=0.0, label_smoothing=0.15,
                           accelerator=ACC)
    trl_losses, _, _ = CPOTrainer.cpo_loss(fake, chosen, rejected)
    ours = (simpo.simpo_loss(chosen, rejected, 0.7, 0.4, 0.15) if loss_type == "simpo"
            else simpo.cpo_loss(chosen, rejected, 0.7, 0.15))
    assert torch.allclose(ours, trl_losses, atol=1e-6, rtol=0)


def test_cpo_nll_is_chosen_nll():
    """CPO's NLL term in TRL (token-mean cross-entropy over chosen completions) is `dpo.chosen_nll`."""
    ids, attention, labels, logits = _pairs(4, B=2, L=7, V=9, prompt_len=None)
    fake, _ = trl_cpo(ids, attention, labels, logits, 0.1, 0.5, 1.0)
    *_, trl_nll = fake.concatenated_forward(_fake_model(logits), _trl_batch(ids, attention, labels))
    policy, batch = _ours(ids, labels, logits)
    B = batch["n_pairs"]
    assert dpo.chosen_nll(policy["logps"][:B], batch["n_tokens"][:B]).item() == pytest.approx(trl_nll.item(), abs=1e-6)
