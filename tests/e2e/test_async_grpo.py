"""Async GRPO end to end through `reinforge train` on a tiny random model, in-process (the snapshot sampler runs in
the background thread; the vLLM-server runs are in tests/serving/test_grpo_vllm.py): it learns, staleness is
logged, the data-producer switch alone changes no number, Ctrl-C with a rollout in flight resumes exactly,
re-rolled prompts come back, zero-signal groups are replaced from the replay buffer, and zero-advantage
micro-batches are skipped on two processes without a hang."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from reinforge.cli import main

from test_distributed import ROLLOUT

BIN = Path(sys.executable).parent

REWARDS = '''
import os
import signal

CALLS = {"n": 0}


def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def topic3_fails(prompts, completions, completion_ids, topic, **kwargs):
    """even_tokens, except that every completion of topic 3 scores 0 (a prompt the policy always fails)."""
    return [0.0 if tp == 3 else r for tp, r in zip(topic, even_tokens(prompts, completions, completion_ids))]


def topic3_flat(prompts, completions, completion_ids, topic, **kwargs):
    """even_tokens, except that topic 3 always scores 0.5: a group with no signal."""
    return [0.5 if tp == 3 else r for tp, r in zip(topic, even_tokens(prompts, completions, completion_ids))]


def interrupting(prompts, completions, completion_ids, **kwargs):
    """even_tokens; sends this process SIGINT while scoring rollout $INTERRUPT_AT (from the producer thread)."""
    if os.environ.get("INTERRUPT_AT"):
        CALLS["n"] += 1
        if CALLS["n"] == int(os.environ["INTERRUPT_AT"]):
            os.kill(os.getpid(), signal.SIGINT)
    return even_tokens(prompts, completions, completion_ids)
'''


def setup(tmp_path, monkeypatch, model_dir, n_prompts=16, **extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "async_rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"Write something about topic {i}."}], "topic": i}
            for i in range(n_prompts)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 8, "max_completion_length": 8, "top_k": 20, "reward_funcs": ["async_rewards.even_tokens"],
           **extra.pop("trl", {})}
    cfg = {"base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "trl": trl,
           "micro_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 16, "learning_rate": 2e-2,
           "lr_scheduler": "constant", "output_dir": "out", "use_tensorboard": False, "seed": 1, **extra}
    path = tmp_path / f"{cfg['output_dir']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


ASYNC = {"use_data_producer": True, "async_prefetch": True, "prefetch_depth": 1}


def test_async_in_process_learns_and_logs_staleness(tmp_path, monkeypatch, tiny_model_dir):
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, trl=ASYNC)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path / "out")
    rewards = [x["reward"] for x in m]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards  # as the synchronous test (> 5 sd)
    # depth 1: the rollout trained at step s > 1 was sampled by the weights of step s - 1
    assert [x["sample/staleness_mean"] for x in m] == [0.0] + [1.0] * 15
    for x in m:
        assert x["time/rollout_wait"] >= 0 and x["time/weight_sync"] >= 0
    # the sampler weights come from each trained micro-batch's forward (none on fully skipped steps)
    trained = [x for x in m if x["skipped_zero_adv_batches"] < 2]
    assert len(trained) >= 8 and all(0 < x["sampling/importance_sampling_ratio/mean"] < 3.0 for x in trained)


def test_data_producer_without_async_changes_no_number(tmp_path, monkeypatch, tiny_model_dir):
    plain = setup(tmp_path, monkeypatch, tiny_model_dir, output_dir="plain", max_steps=4)
    producer = setup(tmp_path, monkeypatch, tiny_model_dir, output_dir="producer", max_steps=4,
                     trl={"use_data_producer": True, "async_prefetch": False})
    assert main(["train", str(plain)]) == 0 and main(["train", str(producer)]) == 0
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "producer")
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("time/") and k != "step_time"} == \
               {k: v for k, v in y.items() if not k.startswith("time/") and k != "step_time"}


def test_ctrl_c_with_a_rollout_in_flight_resumes_exactly(tmp_path, monkeypatch, tiny_model_dir):
    """SIGINT arrives while the background thread scores rollout 3 (step 2 is training): the checkpoint after step 2
    waits for that rollout and keeps it, so the resumed run trains on the very same completions and ends with the
    uninterrupted run's numbers."""
    trl = {**ASYNC, "reward_funcs": ["async_rewards.interrupting"], "top_k": None}
    full = setup(tmp_path, monkeypatch, tiny_model_dir, output_dir="full", max_steps=5, trl=trl)
    assert main(["train", str(full)]) == 0
    cut = setup(tmp_path, monkeypatch, tiny_model_dir, output_dir="cut", max_steps=5, trl=trl)
    monkeypatch.setenv("INTERRUPT_AT", "3")
    assert main(["train", str(cut)]) == 130
    monkeypatch.delenv("INTERRUPT_AT")
    assert [x["step"] for x in metrics(tmp_path / "cut")] == [1, 2]
    saved = torch.load(tmp_path / "cut" / "checkpoint-2" / "rank_0.pt", weights_only=False)["rollout"]["pending"]
    assert list(saved) == [2] and saved[2][0].policy_version == 1  # rollout index 2, sampled after step 1
    assert main(["train", str(cut), "resume_from_checkpoint=true"]) == 0
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5]
    # without top-k the sampler's processed log-probs are the trainer's: equal on step 1 (the snapshot is float32),
    # one optimiser step apart afterwards
    assert a[0]["sampling/sampling_logp_difference/max"] < 1e-3
    assert min(x["sampling/sampling_logp_difference/max"] for x in a[1:]) > 1e-2
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["sample/staleness_mean"] == y["sample/staleness_mean"], (x, y)
        for key in ("loss", "grad_norm", "sampling/importance_sampling_ratio/mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


def test_reroll_brings_failed_prompts_back(tmp_path, monkeypatch, tiny_model_dir):
    """Topic 3 fails every completion; with re-rolls from step 0 it comes back in later rollouts (without: once
    per epoch, 3 times in 6 steps of 2 prompts from 4)."""
    trl = {"use_data_producer": True, "reroll_start_fraction": 0.0, "reroll_max_groups": 1, "num_generations": 4,
           "reward_funcs": ["async_rewards.topic3_fails"], "log_completions": True}
    counts = {}
    for name, extra in (("without", {"reroll_start_fraction": 1.0}), ("with", {})):
        cfg = setup(tmp_path, monkeypatch, tiny_model_dir, n_prompts=4, output_dir=name, micro_batch_size=4,
                    max_steps=6, trl={**trl, **extra})
        assert main(["train", str(cfg)]) == 0
        rows = [json.loads(l) for l in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
        counts[name] = sum(1 for r in rows if "topic 3." in r["prompt"]) // 4  # rollouts that held topic 3
    assert counts["without"] == 3 and counts["with"] > 3, counts
    m = metrics(tmp_path / "with")
    assert sum(x["reroll_injected"] for x in m) == counts["with"] - 3
    assert max(x["reroll_buffer_size"] for x in m) >= 1 and sum(x["reroll_buffered"] for x in m) >= 1


def test_replay_buffer_replaces_zero_signal_groups(tmp_path, monkeypatch, tiny_model_dir):
    trl = {"use_data_producer": True, "replay_buffer_size": 8, "num_generations": 4,
           "reward_funcs": ["async_rewards.topic3_flat"], "log_completions": True}
    cfg = setup(tmp_path, monkeypatch, tiny_model_dir, n_prompts=4, micro_batch_size=4, max_steps=6, trl=trl)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path / "out")
    replaced = sum(x["replay_buffer_replacements"] for x in m)
    assert replaced >= 1 and all(x["replay_buffer_size"] <= 8 for x in m)
    # a replayed group is older than the rollout it joins
    assert any(x["sample/staleness_max"] > 0 for x, r in zip(m, (x["replay_buffer_replacements"] for x in m)) if r)
    # topic 3 is in 3 of the 6 rollouts (once per epoch) and has no signal: once the buffer holds a group, it is
    # replaced, so fewer than 3 of its groups reach the loss (the completion log shows the rollout as trained)
    rows = [json.loads(l) for l in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if "topic 3." in r["prompt"]) // 4 < 3


ZERO_ADV = ROLLOUT + '''

def only_number_0(prompts, completions, completion_ids, **kwargs):
    """Signal for the prompt about number 0 only; every other group scores a flat 0.5 (zero advantages)."""
    return [sum(1 for t in ids if t % 2 == 0) / len(ids) if "number 0." in str(p) else 0.5
            for p, ids in zip(prompts, completion_ids)]
'''


def test_zero_advantage_skipping_on_two_processes(tmp_path, tiny_model_dir, monkeypatch):
    """Only one prompt of eight has signal. On 2 processes a step's micro-batch index is skipped only when it is
    zero on both (one collective decides), so the process holding prompt 0 and the other one run the same
    backward passes and collectives: the run ends (no hang), skips 6 micro-batches in 4 steps (2 per step without
    prompt 0, 1 with it), and ends with the single-process weights."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero_rollout.py").write_text(ZERO_ADV)
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about number {i}."}]} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 2, "max_completion_length": 5, "rollout_func": "zero_rollout.fixed",
           "reward_funcs": ["zero_rollout.only_number_0"]}
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "trl": trl,
           "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 0.05,
           "lr_scheduler": "constant", "optimizer": "sgd", "use_tensorboard": False}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "grpo.yaml", "output_dir=one"]) == 0
    two_processes(tmp_path, "grpo.yaml", "output_dir=two", "micro_batch_size=2")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sum(x["skipped_zero_adv_batches"] for x in two) == 6
    assert sorted({x["skipped_zero_adv_batches"] for x in two}) == [1.0, 2.0]
    assert sum(x["skipped_zero_adv_batches"] for x in one) == 6
    for a, b in zip(one, two, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
    assert any(x["grad_norm"] > 0 for x in two) and any(x["grad_norm"] == 0 for x in two)
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k


def test_async_two_processes_equal_one(tmp_path, tiny_model_dir, monkeypatch):
    """Async on 2 processes: the main process produces both parts of every rollout in its background thread and
    broadcasts them; the run equals the single-process async run (deterministic completions from a rollout
    function, as in tests/e2e/test_distributed.py)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero_rollout.py").write_text(ZERO_ADV)
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about number {i}."}]} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 4, "max_completion_length": 5, "rollout_func": "zero_rollout.fixed",
           "reward_funcs": ["zero_rollout.even_tokens"], "scale_rewards": "batch", **ASYNC}
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "trl": trl,
           "micro_batch_size": 8, "max_steps": 3, "learning_rate": 0.05, "lr_scheduler": "constant", "optimizer": "sgd",
           "use_tensorboard": False}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "grpo.yaml", "output_dir=one"]) == 0
    two_processes(tmp_path, "grpo.yaml", "output_dir=two", "micro_batch_size=4")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["sample/staleness_mean"] for x in two] == [0.0, 1.0, 1.0]
    for a, b in zip(one, two, strict=True):
        for key in ("reward", "reward_std", "grad_norm", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k


def two_processes(cwd, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "reinforge.cli", "train",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# the trl keys of Axolotl's "Full Async GRPO Example" (docs/rlhf), with the seed's values
SEED_ASYNC_KEYS = {"use_data_producer": True, "use_vllm": True, "async_prefetch": True, "prefetch_depth": 1,
                   "vllm_sync_interval": 2, "vllm_lora_sync": True, "streaming_partial_batch": True,
                   "vllm_importance_sampling_correction": True, "off_policy_mask_threshold": 0.5,
                   "importance_sampling_level": "token", "num_generations": 8, "max_completion_length": 512,
                   "reroll_start_fraction": 0.5, "replay_buffer_size": 100, "reward_num_workers": 4,
                   "skip_zero_advantage_batches": True}


def test_async_example_keeps_the_seed_keys_and_validates(capsys):
    from conftest import ROOT

    example = ROOT / "examples" / "grpo-async-gsm8k.yaml"
    raw = yaml.safe_load(example.read_text())
    assert {k: raw["trl"][k] for k in SEED_ASYNC_KEYS} == SEED_ASYNC_KEYS
    assert (raw["gradient_accumulation_steps"], raw["micro_batch_size"], raw["max_steps"], raw["bf16"],
            raw["gradient_checkpointing"], raw["lora_r"], raw["lora_alpha"]) == (4, 2, 500, True, True, 32, 64)
    assert main(["validate", str(example)]) == 0
