"""Config: strict keys with suggestions, overrides, ranges."""

import pytest

from reinforge.config import ConfigError, load_config, parse_overrides
from reinforge.config.loader import build_config

BASE = {
    "base_model": "m",
    "rl": "dpo",
    "datasets": [{"path": "d.json", "type": "chat_template.default"}],
}


def test_unknown_top_level_key_names_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: m\nrl: dpo\nlearnig_rate: 1e-5\ndatasets:\n  - path: d.json\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "unknown key `learnig_rate`" in str(e.value)
    assert "did you mean `learning_rate`" in str(e.value)


def test_unknown_nested_keys_name_closest():
    data = {**BASE, "trl": {"bta": 0.1}, "datasets": [{"path": "d.json", "feild_messages": "m"}]}
    with pytest.raises(ConfigError) as e:
        build_config(data)
    msg = str(e.value)
    assert "`trl.bta`; did you mean `trl.beta`" in msg
    assert "`datasets[0].feild_messages`; did you mean `datasets[0].field_messages`" in msg


def test_out_of_range_value_is_named():
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "micro_batch_size": 0})
    assert "micro_batch_size" in str(e.value)


def test_overrides_nested_and_typed(tmp_path):
    assert parse_overrides(["learning_rate=1e-5", "trl.beta=0.05", "adapter=lora", "lora_target_modules=[q_proj,v_proj]"]) == {
        "learning_rate": 1e-5, "trl": {"beta": 0.05}, "adapter": "lora", "lora_target_modules": ["q_proj", "v_proj"]}
    p = tmp_path / "c.yaml"
    p.write_text("base_model: m\nrl: dpo\nlearning_rate: 1.0e-3\ndatasets:\n  - path: d.json\n")
    cfg = load_config(p, ["learning_rate=2e-5", "trl.beta=0.2"])
    assert cfg.learning_rate == 2e-5 and cfg.beta == 0.2


def test_beta_sources_must_agree():
    with pytest.raises(ConfigError, match="disagree"):
        build_config({**BASE, "rl_beta": 0.1, "trl": {"beta": 0.2}})
    assert build_config({**BASE, "rl_beta": 0.3}).beta == 0.3


def test_gdpo_sets_normalize_then_sum():
    cfg = build_config({**BASE, "rl": "gdpo", "trl": {"reward_funcs": ["a.b", "a.c"], "num_generations": 2},
                        "micro_batch_size": 2})
    assert cfg.trl.multi_objective_aggregation == "normalize_then_sum"


def test_online_validation_names_the_problem():
    base = {**BASE, "rl": "grpo", "micro_batch_size": 4}
    with pytest.raises(ConfigError, match="needs trl.reward_funcs"):
        build_config(base)
    with pytest.raises(ConfigError, match="divisible by trl.num_generations"):
        build_config({**base, "trl": {"reward_funcs": ["m.f"], "num_generations": 3}})
    with pytest.raises(ConfigError, match="reward_weights has 2 entries for 1"):
        build_config({**base, "trl": {"reward_funcs": ["m.f"], "num_generations": 2, "reward_weights": [1, 2]}})
    with pytest.raises(ConfigError, match="valid: grpo, bnpo, dr_grpo, dapo"):
        build_config({**base, "trl": {"reward_funcs": ["m.f"], "num_generations": 2, "loss_type": "ppo"}})
    with pytest.raises(ConfigError, match="num_generations"):
        build_config({**base, "trl": {"reward_funcs": ["m.f"], "num_generations": 1}})
    trl = {"reward_funcs": ["m.f"], "num_generations": 2}
    with pytest.raises(ConfigError, match="generates with the policy in-process, which needs whole"):
        build_config({**base, "trl": trl, "fsdp_config": {"fsdp_version": 2}})
    with pytest.raises(ConfigError, match="syncs the policy's weights to the vLLM server, which needs whole"):
        build_config({**base, "trl": {**trl, "use_vllm": True}, "fsdp_config": {"fsdp_version": 2}})


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from reinforge.config.schema import DatasetConfig, ReinforgeConfig, TRLConfig

    for model in (ReinforgeConfig, DatasetConfig, TRLConfig):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
        assert model.model_config.get("extra") == "forbid"
    assert issubclass(ReinforgeConfig, BaseModel)
