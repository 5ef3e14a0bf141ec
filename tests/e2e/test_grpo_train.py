"""GRPO/GDPO end to end on a tiny random model: the policy learns a simple reward; errors are clear."""

import json
import math
from pathlib import Path

import pytest
import yaml

from reinforge.cli import main

REWARDS = '''
def even_tokens(prompts, completions, completion_ids, **kwargs):
    """Fraction of completion tokens with an even id: learnable by a random model under top-k sampling."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def constant(prompts, completions, completion_ids, **kwargs):
    return [1.0 for _ in completions]


def explode(prompts, completions, **kwargs):
    raise ZeroDivisionError("boom")
'''


def setup(tmp_path, monkeypatch, tiny_model_dir, **extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"Write something about topic {i}."}], "topic": i} for i in range(16)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 8, "max_completion_length": 8, "top_k": 20, "reward_funcs": ["my_rewards.even_tokens"],
           "loss_type": "dapo", **extra.pop("trl", {})}
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "trl": trl,
           "micro_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 16, "learning_rate": 2e-2,
           "lr_scheduler": "constant", "output_dir": "out", "use_tensorboard": False, "seed": 1, **extra}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "grpo.yaml"


def metrics(tmp_path):
    return [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_even_token_reward(tmp_path, monkeypatch, tiny_model_dir):
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, trl={"log_completions": True})
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    rewards = [x["reward"] for x in m]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # A random policy scores ~0.5 (half of the ids are even). Each step samples 16 completions of 8
    # tokens, so the std of one step's mean reward is ~0.5/sqrt(128) ≈ 0.045 and of a 4-step mean ~0.02:
    # a rise of 0.15 is > 5 standard deviations away from chance.
    assert last > first + 0.15, rewards
    trained = [x for x in m if x["skipped_zero_adv_batches"] < 2]  # converged steps skip their micro-batches
    for key in ("reward", "reward_std", "rewards/even_tokens/mean", "rewards/even_tokens/std", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "grad_norm", "loss",
                "entropy"):
        assert key in trained[-1], key
    vocab = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    assert all(0.0 < x["entropy"] <= math.log(vocab) + 1e-4 for x in trained), [x["entropy"] for x in trained]  # nats
    lines = (tmp_path / "out" / "completions.jsonl").read_text().splitlines()  # 16 rollouts × 16 completions
    assert len(lines) == 16 * 16 and "even_tokens" in json.loads(lines[0])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_gdpo_with_reference_and_two_rewards_runs(tmp_path, monkeypatch, tiny_model_dir):
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, rl="gdpo", max_steps=2, adapter="lora", lora_target_linear=True,
                trl={"reward_funcs": ["my_rewards.even_tokens", "my_rewards.constant"], "reward_weights": [1.0, 0.5],
                     "beta": 0.04, "num_iterations": 2, "loss_type": "grpo"})
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path)
    # num_iterations 2: step 1 generates and takes the first pass, step 2 the second pass of the same rollout
    assert m[0]["rewards/constant/mean"] == 1.0 and "reward" not in m[1]
    assert "kl" in m[0] and "kl" in m[1] and m[0]["kl"] == 0.0  # policy == reference before the first update
    assert m[1]["kl"] > 0.0
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_raising_reward_function_stops_with_its_name(tmp_path, monkeypatch, tiny_model_dir, capsys):
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, max_steps=1, trl={"reward_funcs": ["my_rewards.explode"]})
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "explode" in err and "ZeroDivisionError" in err and "boom" in err


def test_prefix_sharing_changes_no_number(tmp_path, monkeypatch, tiny_model_dir):
    """The default layout (a prompt once for its completions, packed in one row) against one padded row per
    completion: the same rollouts (same sampling seeds) give the same first-step loss, entropy, clip ratios and
    gradient norm, to float32 rounding; num_iterations 2 and beta > 0 make the old and reference passes use the
    layout too."""
    runs = {}
    for share in (True, False):
        d = tmp_path / str(share)
        d.mkdir()
        cfg = setup(d, monkeypatch, tiny_model_dir, max_steps=2, prefix_sharing=share, sample_packing=share,
                    trl={"beta": 0.04, "num_iterations": 2})
        assert main(["train", str(cfg)]) == 0
        runs[share] = metrics(d)[0]
    on, off = runs[True], runs[False]
    assert on["reward"] == off["reward"] and on["completions/mean_length"] == off["completions/mean_length"]
    for key in ("loss", "entropy", "kl", "grad_norm", "clip_ratio/region_mean"):
        assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("learning_rate", [2e-2, 1e-12])
def test_grpo_evaluates_held_out_prompts(tmp_path, monkeypatch, tiny_model_dir, learning_rate):
    """val_set_size holds prompts out; they are sampled and scored before the first step, every eval_steps and
    after the last, with the same seeds each time (eval_* metrics, TRL's names): the eval reward rises as the policy
    learns, and with a learning rate too small to move a float32 weight the last evaluation equals the first."""
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, val_set_size=4, eval_steps=6, max_steps=12,
                learning_rate=learning_rate)
    assert main(["train", str(cfg)]) == 0
    evals = [x for x in metrics(tmp_path) if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 6, 12]
    for key in ("eval_rewards/even_tokens/mean", "eval_reward_std", "eval_completions/mean_length"):
        assert key in evals[0], key
    first, last = evals[0], evals[-1]
    if learning_rate < 1e-9:
        assert {k: v for k, v in last.items() if k.startswith("eval_")} == \
            pytest.approx({k: v for k, v in first.items() if k.startswith("eval_")}, rel=1e-6)
    else:  # 4 prompts × 8 completions of 8 tokens: std of the mean reward ≈ 0.5/sqrt(256) ≈ 0.03
        assert last["eval_reward"] > first["eval_reward"] + 0.1, evals

