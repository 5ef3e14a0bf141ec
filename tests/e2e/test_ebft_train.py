"""Structured EBFT end to end through `reinforge train` on a tiny random model: completions generated like GRPO,
rewarded by feature matching against each row's ground truth (LoRA: the adapter-disabled policy is the feature
network; full fine-tuning: a frozen copy), with Axolotl's `ebft:` keys and metric names."""

import json

import pytest
import yaml

from reinforge.cli import main


def setup(tmp_path, monkeypatch, model_dir, **extra):
    monkeypatch.chdir(tmp_path)
    rows = [{"input": f"Write the number {i} in words.", "output": f"The number is {i}; that is all."} for i in range(8)]
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(model_dir), "rl": "ebft", "datasets": [{"path": "code.jsonl", "type": "ebft_opencode.transform"}],
           "ebft": {"feature_layers": [0.5, 1.0], "embed_method": "mean_pooling", **extra.pop("ebft", {})},
           "trl": {"num_generations": 4, "max_completion_length": 8, "top_k": 20, "loss_type": "grpo",
                   **extra.pop("trl", {})},
           "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-2,
           "lr_scheduler": "constant", "output_dir": "out", "use_tensorboard": False, "seed": 3, **extra}
    (tmp_path / "ebft.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ebft.yaml"


def metrics(tmp_path):
    return [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("adapter", ["lora", None])
@pytest.mark.parametrize("whiten", [False, True])
def test_structured_ebft_trains(tmp_path, monkeypatch, tiny_model_dir, adapter, whiten):
    extra = {"adapter": "lora", "lora_r": 4, "lora_target_linear": True} if adapter else {}
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, ebft={"use_whitening": whiten}, **extra)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    for x in m:
        for key in ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "reward", "reward_std",
                    "rewards/feature_matching/mean", "completions/mean_length"):
            assert key in x and x[key] == x[key], key  # present and not NaN
        # reward = α·alignment − β·diversity (both coefficients 1), averaged the same way
        assert x["ebft/reward"] == pytest.approx(x["ebft/alignment"] - x["ebft/diversity"], abs=1e-5)
        assert x["reward"] == pytest.approx(x["ebft/reward"], abs=1e-5)
        if not whiten:  # normalised features: |2 cos| ≤ 2, diversity within [−2, 2], cfm ≤ 4
            assert -2 <= x["ebft/alignment"] <= 2 and -2 <= x["ebft/diversity"] <= 2 and 0 <= x["ebft/cfm_loss"] <= 4
    assert any(x.get("grad_norm", 0) > 0 for x in m)


def test_ebft_config_errors(tmp_path, monkeypatch, tiny_model_dir, capsys):
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, trl={"reward_funcs": ["accuracy"]})
    assert main(["validate", str(cfg)]) != 0
    assert "remove trl.reward_funcs" in capsys.readouterr().err
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, ebft={"embed_methd": "last_token"})
    assert main(["validate", str(cfg)]) != 0
    assert "embed_method" in capsys.readouterr().err  # the closest valid key
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, rl="grpo", trl={"reward_funcs": ["accuracy"]})
    assert main(["validate", str(cfg)]) != 0
    assert "the ebft: section is used only with rl: ebft" in capsys.readouterr().err


def strided_setup(tmp_path, monkeypatch, model_dir, rows, ds_type, **extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(model_dir), "rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": ds_type}],
           "ebft": {"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 3,
                    "n_samples_per_prompt": 2, "feature_layers": [0.5, 1.0], **extra.pop("ebft", {})},
           "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 3, "learning_rate": 1e-2,
           "lr_scheduler": "constant", "output_dir": "out", "use_tensorboard": False, "seed": 3, "sequence_len": 40,
           **extra}
    (tmp_path / "ebft.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ebft.yaml"


TEXTS = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}  # a small function number {i}\n"} for i in range(6)]


@pytest.mark.parametrize("adapter", ["lora", None])
def test_strided_ebft_trains_on_plain_text(tmp_path, monkeypatch, tiny_model_dir, adapter):
    extra = {"adapter": "lora", "lora_r": 4, "lora_target_linear": True} if adapter else {}
    cfg = strided_setup(tmp_path, monkeypatch, tiny_model_dir, TEXTS, "ebft_pretrain.transform",
                        ebft={"ce_coef": 0.03, "use_whitening": adapter is None}, **extra)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    for x in m:
        for key in ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "ebft/rl_loss", "ebft/ce_loss",
                    "ebft/num_blocks", "ebft/advantages_std", "ebft/mean_reward", "loss", "grad_norm"):
            assert key in x and x[key] == x[key], key
        assert x["ebft/num_blocks"] >= 2 and x["ebft/ce_loss"] > 0 and x["grad_norm"] > 0
        assert x["loss"] == pytest.approx(x["ebft/rl_loss"] + 0.03 * x["ebft/ce_loss"], rel=1e-4, abs=1e-6)
    saved = "adapter_config.json" if adapter else "model.safetensors"  # the adapter only, or the full model
    assert (tmp_path / "out" / saved).exists() and not (adapter and (tmp_path / "out" / "model.safetensors").exists())


def test_strided_ebft_prompt_completion_rows(tmp_path, monkeypatch, tiny_model_dir):
    rows = [{"input": f"Square {i}:", "output": f"The square of {i} is {i * i}, computed as {i} times {i}."}
            for i in range(4)]
    cfg = strided_setup(tmp_path, monkeypatch, tiny_model_dir, rows, "ebft_strided_structured.transform",
                        ebft={"advantage_estimator": "group_norm"})
    assert main(["train", str(cfg)]) == 0
    assert all(x["ebft/num_blocks"] >= 2 and x["ebft/ce_loss"] == 0.0 for x in metrics(tmp_path))
