"""The reference a run uses is the one the config asks for, through `reinforge train`:

- `ref_model` (a different tiny model directory), with full fine-tuning and with LoRA: the first step's logged
  `rewards/chosen` / `rewards/rejected` equal β·(policy − that reference) summed completion log-probs, computed
  here with a plain transformers forward of both models (at step 1 the policy is still the base model: LoRA's B
  starts at 0); the default reference gives 0 there;
- `rl_adapter_ref_model: true` with LoRA: `base_model` is loaded again as a separate frozen model (the log names
  it), and since it holds the weights the adapter-disabled policy computes with, every step's metrics equal the
  default LoRA run's; from step 2 the rewards are not 0, so the reference is not the trained policy;
- a `ref_model` with another vocabulary is refused, naming both sizes.
"""

import json
import logging

import pytest
import torch
import yaml

from reinforge.cli import main

from conftest import DATA_DIR, build_tiny_model

BETA = 0.1
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


@pytest.fixture(scope="module")
def other_ref_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("other-ref"), seed=2)


def _rows():
    """4 short conversational pairs (TRL layout): no truncation at sequence_len 128."""
    src = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:4]
    return [{"prompt": [{"role": "user", "content": r["conversations"][0]["value"][:120]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]["value"][:120]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]["value"][:120]}]} for r in src]


def _config(tmp_path, name, model_dir, **extra):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()))
    cfg = {"base_model": str(model_dir), "rl": "dpo", "rl_beta": BETA, "datasets": [{"path": str(tmp_path / "pairs.jsonl")}],
           "sequence_len": 128, "micro_batch_size": 4, "max_steps": 3, "learning_rate": 5e-3, "lr_scheduler": "constant",
           "output_dir": str(tmp_path / name), "use_tensorboard": False, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(path):
    assert main(["train", str(path)]) == 0
    out = yaml.safe_load(path.read_text())["output_dir"]
    from pathlib import Path

    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _completion_logps(model_dir, pairs):
    """Summed log-probs of chosen and rejected completion tokens given the prompt, with a plain forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for row in pairs:
            for side in out:
                ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
                P = len(row["prompt_ids"])
                targets = ids[0, P:]
                out[side].append(float(logp[torch.arange(P - 1, ids.shape[1] - 1), targets].sum()))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _prepared_pairs(path):
    """The tokenised training rows of a config (reinforge's data pipeline; what is under test is the reference)."""
    from reinforge.config.loader import load_config
    from reinforge.data.prepare import prepare_data
    from reinforge.models.loading import load_tokenizer

    cfg = load_config(path)
    data = prepare_data(cfg, load_tokenizer(cfg))
    assert len(data.train) == 4 and all(len(r["prompt_ids"]) > 0 for r in data.train)
    return data.train


def _expected_first_step(policy_dir, ref_dir, pairs):
    pol, ref = _completion_logps(policy_dir, pairs), _completion_logps(ref_dir, pairs)
    return {"rewards/chosen": float(BETA * (pol["chosen"] - ref["chosen"]).mean()),
            "rewards/rejected": float(BETA * (pol["rejected"] - ref["rejected"]).mean()),
            "logps/chosen": float(pol["chosen"].mean()), "logps/rejected": float(pol["rejected"].mean())}


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_ref_model_is_the_reference(tmp_path, tiny_model_dir, other_ref_dir, adapter, caplog):
    caplog.set_level(logging.INFO, logger="reinforge")
    extra = LORA if adapter else {}
    path = _config(tmp_path, "other", tiny_model_dir, ref_model=str(other_ref_dir), **extra)
    first = _train(path)[0]
    assert f"reference: frozen model {other_ref_dir}" in caplog.text
    expected = _expected_first_step(tiny_model_dir, other_ref_dir, _prepared_pairs(path))
    assert abs(expected["rewards/chosen"]) > 0.02 and abs(expected["rewards/rejected"]) > 0.02  # far from 0
    for key, value in expected.items():
        assert abs(first[key] - value) < 1e-5 + 1e-6 * abs(value), (key, first[key], value)  # float32 vs float64
    # the default reference (a frozen copy of base_model / the adapter-disabled policy) starts at rewards 0
    default = _train(_config(tmp_path, "default", tiny_model_dir, **extra))[0]
    assert default["rewards/chosen"] == 0.0 and default["rewards/rejected"] == 0.0
    assert abs(default["logps/chosen"] - first["logps/chosen"]) < 1e-5  # the same policy, another reference


def test_rl_adapter_ref_model_loads_a_separate_base_model(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="reinforge")
    separate = _train(_config(tmp_path, "separate", tiny_model_dir, rl_adapter_ref_model=True, **LORA))
    assert f"reference: frozen model {tiny_model_dir}" in caplog.text
    caplog.clear()
    disabled = _train(_config(tmp_path, "disabled", tiny_model_dir, **LORA))
    assert "reference: adapter-disabled policy" in caplog.text
    assert [m["step"] for m in separate] == [m["step"] for m in disabled] == [1, 2, 3]
    for a, b in zip(separate, disabled):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    assert separate[0]["rewards/chosen"] == 0.0  # step 1: the policy is the base model
    assert abs(separate[2]["rewards/margins"]) > 1e-3  # the adapter trained; the reference stayed the base model


def test_ref_model_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(n + 8)
    model.save_pretrained(tmp_path / "bigger-vocab")
    path = _config(tmp_path, "refused", tiny_model_dir, ref_model=str(tmp_path / "bigger-vocab"), max_steps=1)
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"has a vocabulary of {n + 8} tokens but the policy ({tiny_model_dir}) has {n}" in err
