"""Preference-method config keys: ranges, cross-field checks that need `rl`, and what build_objective resolves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reinforge.algorithms import dpo
from reinforge.config.loader import ConfigError, build_config
from reinforge.config.preference import DPO_LOSS_ALIASES, DPO_LOSS_TYPES
from reinforge.training.objectives import DPOObjective, KTOObjective, ORPOObjective, SimPOObjective, build_objective

BASE = {"base_model": "m", "datasets": [{"path": "d.json"}]}


def cfg(**kw):
    return build_config({**BASE, **kw})


def error(**kw) -> str:
    with pytest.raises(ConfigError) as exc:
        cfg(**kw)
    return str(exc.value)


def test_loss_names_match_the_algorithms():
    assert DPO_LOSS_TYPES == dpo.LOSS_TYPES
    assert DPO_LOSS_ALIASES == dpo.LOSS_ALIASES


def test_dpo_loss_list_and_weights():
    c = cfg(rl="dpo", dpo_loss_type=["sigmoid", "bco_pair", "sft"], dpo_loss_weights=[0.8, 0.2, 1.0])
    assert c.dpo_loss_types_value == ["sigmoid", "bco_pair", "sft"]
    assert c.dpo_loss_weights_value == [0.8, 0.2, 1.0]
    assert cfg(rl="dpo", dpo_loss_type="hinge").dpo_loss_types_value == ["hinge"]  # a string is a 1-list
    assert cfg(rl="dpo").dpo_loss_types_value == ["sigmoid"]
    assert cfg(rl="dpo", dpo_loss_type=["aot_pair"]).dpo_loss_types_value == ["aot_unpaired"]
    assert cfg(rl="ipo").dpo_loss_types_value == ["ipo"]


def test_unknown_loss_type_names_the_valid_ones():
    msg = error(rl="dpo", dpo_loss_type=["sigmoid", "sigmod"])
    assert "'sigmod'" in msg and "sigmoid, hinge, ipo" in msg and "sigmoid_norm" in msg


def test_weights_must_match_types():
    assert "2 entries but there are 3 loss types" in error(rl="dpo", dpo_loss_type=["sigmoid", "ipo", "sft"],
                                                           dpo_loss_weights=[1.0, 1.0])
    assert "give one weight per type" in error(rl="dpo", dpo_loss_weights=[1.0, 2.0])
    assert ">= 0" in error(rl="dpo", dpo_loss_weights=[-1.0])
    assert "twice" in error(rl="dpo", dpo_loss_type=["sigmoid", "sigmoid"])


def test_label_smoothing_rules():
    assert "IPO" in error(rl="ipo", dpo_label_smoothing=0.1)
    assert "IPO" in error(rl="dpo", dpo_loss_type=["ipo", "sigmoid"], dpo_label_smoothing=0.1)
    assert "no effect" in error(rl="dpo", dpo_loss_type=["hinge"], dpo_label_smoothing=0.1)
    assert "dpo_label_smoothing" in error(rl="dpo", dpo_label_smoothing=0.5)  # range [0, 0.5)
    assert "exo_pair needs dpo_label_smoothing > 0" in error(rl="dpo", dpo_loss_type=["exo_pair"])
    assert cfg(rl="dpo", dpo_label_smoothing=0.1).dpo_label_smoothing == 0.1  # cDPO
    assert cfg(rl="dpo", dpo_loss_type=["robust"], dpo_label_smoothing=0.2).dpo_label_smoothing == 0.2


def test_ipo_alias_and_loss_list_conflict():
    assert "rl: ipo is dpo_loss_type: [ipo]" in error(rl="ipo", dpo_loss_type=["ipo"])


def test_keys_of_other_methods_are_errors():
    assert "kto_desirable_weight is used only with rl: kto" in error(rl="dpo", kto_desirable_weight=1.0)
    assert "orpo_alpha is used only with rl: orpo" in error(rl="simpo", orpo_alpha=0.1)
    assert "simpo_gamma is used only with rl: simpo" in error(rl="orpo", simpo_gamma=0.5)
    assert "dpo_loss_type is used only with rl: dpo / ipo" in error(rl="kto", micro_batch_size=2,
                                                                     dpo_loss_type=["sigmoid"])
    assert "rpo_alpha" in error(rl="orpo", rpo_alpha=1.0)


def test_ranges():
    assert "ld_alpha" in error(rl="dpo", ld_alpha=1.5)
    assert "kto_undesirable_weight" in error(rl="kto", micro_batch_size=2, kto_undesirable_weight=0.0)
    assert "cpo_alpha" in error(rl="simpo", cpo_alpha=-1.0)
    assert "dpo_discopop_tau" in error(rl="dpo", dpo_loss_type=["discopop"], dpo_discopop_tau=0.0)


def test_dpo_variant_specific_keys():
    assert "aot" in error(rl="dpo", dpo_loss_type=["aot"], dpo_use_weighting=True)
    assert "discopop" in error(rl="dpo", dpo_discopop_tau=0.1)
    assert "bco_pair" in error(rl="dpo", dpo_bco_running_mean=False)
    assert "precompute_ref_log_probs" in error(rl="dpo", ld_alpha=0.5, precompute_ref_log_probs=True)


def test_kto_needs_two_rows_per_batch():
    assert "micro_batch_size >= 2" in error(rl="kto", micro_batch_size=1)
    assert "eval_batch_size >= 2" in error(rl="kto", micro_batch_size=4, eval_batch_size=1)


def test_orpo_alpha_and_beta_must_agree():
    assert "set one" in error(rl="orpo", orpo_alpha=0.2, rl_beta=0.1)
    assert cfg(rl="orpo", orpo_alpha=0.2, rl_beta=0.2).orpo_alpha == 0.2


def test_build_objective_resolves_defaults():
    o = build_objective(cfg(rl="dpo"))
    assert isinstance(o, DPOObjective) and o.beta == 0.1 and o.loss_types == ("sigmoid",) and o.needs_reference
    o = build_objective(cfg(rl="dpo", rl_beta=0.2, dpo_loss_type=["sigmoid", "bco_pair", "sft"],
                            dpo_loss_weights=[0.8, 0.2, 1.0], dpo_bco_running_mean=False, rpo_alpha=0.5))
    assert o.loss_weights == (0.8, 0.2, 1.0) and o.bco_running_mean is False and o.rpo_alpha == 0.5
    assert o._weights == (0.8, 0.2, 1.5)  # RPO adds to the sft weight
    o = build_objective(cfg(rl="ipo", trl={"beta": 0.05}))
    assert o.loss_types == ("ipo",) and o.beta == 0.05
    o = build_objective(cfg(rl="kto", micro_batch_size=2, kto_undesirable_weight=1.33))
    assert isinstance(o, KTOObjective) and (o.beta, o.desirable_weight, o.undesirable_weight) == (0.1, 1.0, 1.33)
    assert o.needs_reference
    o = build_objective(cfg(rl="orpo"))
    assert isinstance(o, ORPOObjective) and o.alpha == 0.1 and not o.needs_reference
    assert build_objective(cfg(rl="orpo", orpo_alpha=0.5)).alpha == 0.5
    assert build_objective(cfg(rl="orpo", rl_beta=0.3)).alpha == 0.3  # Axolotl reads rl_beta for ORPO's λ
    o = build_objective(cfg(rl="simpo"))
    assert isinstance(o, SimPOObjective) and (o.beta, o.gamma, o.cpo_alpha) == (2.0, 0.5, 0.0)
    assert not o.needs_reference
    o = build_objective(cfg(rl="simpo", rl_beta=2.5, simpo_gamma=1.0, cpo_alpha=1.0))
    assert (o.beta, o.gamma, o.cpo_alpha) == (2.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="no offline objective"):
        build_objective(SimpleNamespace(rl="grpo"))
