"""The rollout functions users bring run end to end on a tiny model: Axolotl's form (model, processing_class,
prompts, generation_config) returning strings, and TRL 1.16's form (prompts, trainer) returning a dict whose
env_mask keeps tokens out of the loss and whose extra fields reach the reward functions. Config errors of the
online keys."""

import json

import pytest
import yaml

from reinforge.cli import main
from reinforge.config import ConfigError
from reinforge.config.loader import build_config

FUNCS = '''
import torch


def axolotl_rollout(model, processing_class, prompts, generation_config=None):
    out = []
    for prompt in prompts:
        text = processing_class.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
        ids = processing_class(text, return_tensors="pt")["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation_config)
        out.append(processing_class.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def trl_rollout(prompts, trainer):
    tok = trainer.processing_class
    n = len(prompts)
    prompt_ids = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompt_ids]
    # model tokens 10..13, an "environment" token 99 (out of the loss), then EOS
    completion_ids = [[10 + i % 4, 11, 99, 12, tok.eos_token_id] for i in range(n)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None,
            "env_mask": [[1, 1, 0, 1, 1]] * n, "tool_result": [f"r{i % 4}" for i in range(n)]}


def from_tool(prompts, completions, tool_result, **kwargs):
    return [float(r[1]) for r in tool_result]


def length(prompts, completions, completion_ids, **kwargs):
    return [len(c) / 8 for c in completion_ids]
'''


def run(tmp_path, monkeypatch, tiny_model_dir, **trl):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_rollouts.py").write_text(FUNCS)
    rows = [{"prompt": [{"role": "user", "content": f"Topic {i}?"}]} for i in range(4)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}],
           "trl": {"num_generations": 4, "max_completion_length": 6, **trl}, "micro_batch_size": 4,
           "max_steps": 2, "learning_rate": 1e-3, "output_dir": "out", "use_tensorboard": False, "seed": 2}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    return [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_axolotl_form_rollout(tmp_path, monkeypatch, tiny_model_dir):
    m = run(tmp_path, monkeypatch, tiny_model_dir, rollout_func="user_rollouts.axolotl_rollout",
            reward_funcs=["user_rollouts.length"])
    # completions are the strings the function returned, re-tokenised with EOS appended: finished, never clipped
    # (their length can differ from the 6 generated tokens: decoding and re-encoding a random model's tokens)
    assert len(m) == 2 and m[0]["completions/min_length"] >= 1 and m[0]["completions/clipped_ratio"] == 0.0
    assert "loss" in m[0] and "grad_norm" in m[0]


def test_trl_form_rollout_with_env_mask_and_extra_fields(tmp_path, monkeypatch, tiny_model_dir):
    m = run(tmp_path, monkeypatch, tiny_model_dir, rollout_func="user_rollouts.trl_rollout",
            reward_funcs=["user_rollouts.from_tool"])
    # the reward reads the extra field tool_result (0, 1, 2, 3 per group): mean 1.5
    assert m[0]["rewards/from_tool/mean"] == pytest.approx(1.5)
    # lengths count only the model's tokens (env_mask 1): 4 of the 5
    assert m[0]["completions/mean_length"] == 4.0


def test_rollout_func_of_no_known_form_names_the_forms(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad_rollout.py").write_text("def fn(x, y):\n    return []\n")
    rows = [{"prompt": "p"}] * 4
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}],
           "trl": {"num_generations": 4, "rollout_func": "bad_rollout.fn", "reward_funcs": ["accuracy"]},
           "micro_batch_size": 4, "max_steps": 1, "output_dir": "out", "use_tensorboard": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) != 0
    err = capsys.readouterr().err
    assert "bad_rollout.fn" in err and "TRL 1.16: fn(prompts, trainer)" in err and "Axolotl: fn(model, processing_class" in err


BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}], "trl": {"reward_funcs": ["accuracy"]}, "micro_batch_size": 8}


@pytest.mark.parametrize("extra,message", [
    ({"rl": "ebft"}, "remove trl.reward_funcs"),  # EBFT's reward is the feature matching
    ({"rl": "grpo", "trl": {"reward_funcs": ["accuracy"], "use_vllm": True, "vllm_mode": "colocate"}},
     "vllm_mode: colocate is not supported"),
    ({"rl": "grpo", "trl": {"reward_funcs": ["accuracy"], "vllm_lora_sync": True}}, "vllm_lora_sync syncs a LoRA adapter"),
    ({"rl": "grpo", "trl": {"reward_funcs": ["accuracy"], "vllm_importance_sampling_mode": "token"}},
     "vllm_importance_sampling_mode"),
    ({"rl": "grpo", "vllm": {"prot": 8000}}, "port"),
])
def test_online_config_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**BASE, **extra})
