"""Two processes (gloo on this CPU) compute what one process computes, for DPO and GRPO.

The single-process run takes micro_batch_size B; the two-process run B/2 per process, so the global batch
is the same: the losses logged and the parameters after the updates must agree to 1e-5. The optimiser is
SGD: Adam divides by sqrt(v) + 1e-8, which turns float-rounding differences of near-zero gradients (the
order of the cross-process sum) into visible weight differences (~2e-5 after 3 steps on one entry of the
tied embedding here) that say nothing about the data parallelism. The two-process
DPO run goes through `reinforge train --num-processes 2` (torch.distributed.run), GRPO through
`accelerate launch`. GRPO's completions come from a deterministic `rollout_func` (sampling differs by
process), and `scale_rewards: batch` checks that rewards are gathered before the advantages are computed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from reinforge.cli import main

from conftest import DATA_DIR

BIN = Path(sys.executable).parent


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def run_two(cmd, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same(one, two, keys):
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    for a, b in zip(m1, m2):
        for key in keys:
            if key in a or key in b:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k
    return m1


def test_dpo_two_processes_equal_one(tmp_path, tiny_model_dir):
    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:10]  # 8 train rows (2 steps of 4), 2 eval
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    ds = {"path": str(tmp_path / "pairs.json"), "type": "chat_template.default", "field_messages": "conversations",
          "message_property_mappings": {"role": "from", "content": "value"}, "roles": {"user": ["human"], "assistant": ["gpt"]}}
    cfg = {"base_model": str(tiny_model_dir), "rl": "dpo", "rl_beta": 0.1, "datasets": [ds], "sequence_len": 96,
           "micro_batch_size": 4, "max_steps": 3, "learning_rate": 0.05, "lr_scheduler": "cosine", "optimizer": "sgd",
           "use_tensorboard": False, "val_set_size": 2}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), f"output_dir={tmp_path / 'one'}"]) == 0
    run_two([str(BIN / "reinforge"), "train", str(path), f"output_dir={tmp_path / 'two'}", "micro_batch_size=2",
             "--num-processes", "2"], tmp_path)
    keys = ("loss", "rewards/margins", "grad_norm", "learning_rate", "eval_loss", "eval_rewards/margins")
    m = assert_same(tmp_path / "one", tmp_path / "two", keys)
    train = [x for x in m if "loss" in x]
    assert abs(train[0]["loss"] - 0.6931) < 1e-3 and train[2]["loss"] < train[0]["loss"] - 1e-3  # it learns
    assert len([x for x in m if "eval_loss" in x]) == 2


ROLLOUT = '''
from reinforge.rollout import Completions


def fixed(prompts, prompt_ids, generator, tokenizer, params):
    """Completions that depend only on the prompt (never on the process): 5 tokens each, no EOS."""
    out = []
    for ids in prompt_ids:
        for j in range(params.n):
            out.append([(sum(ids) * 7 + j * 131 + t * 17) % 5000 + 100 for t in range(5)])
    return Completions(completion_ids=out, truncated=[True] * len(out))


def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / len(ids) for ids in completion_ids]
'''


def test_grpo_two_processes_equal_one(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dist_rollout.py").write_text(ROLLOUT)
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about number {i}."}]} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 4, "max_completion_length": 5, "rollout_func": "dist_rollout.fixed",
           "reward_funcs": ["dist_rollout.even_tokens"], "scale_rewards": "batch", "beta": 0.04}
    cfg = {"base_model": str(tiny_model_dir), "rl": "grpo", "datasets": [{"path": "prompts.jsonl"}], "trl": trl,
           "micro_batch_size": 8, "max_steps": 2, "learning_rate": 0.05, "lr_scheduler": "constant", "optimizer": "sgd",
           "use_tensorboard": False}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "grpo.yaml", "output_dir=one"]) == 0
    run_two([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "reinforge.cli", "train", "grpo.yaml",
             "output_dir=two", "micro_batch_size=4"], tmp_path)
    m = assert_same(tmp_path / "one", tmp_path / "two", ("loss", "reward", "reward_std", "kl", "grad_norm"))
    assert m[0]["frac_reward_zero_std"] == 0.0 and m[0]["grad_norm"] > 0 and m[1]["kl"] > 0
    base, trained = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)


def test_ctrl_c_stops_both_processes_after_the_same_step(tmp_path, tiny_model_dir):
    """A terminal's Ctrl-C (SIGINT to the whole process group) reaches the launcher and both workers once: they
    agree on the step, write one checkpoint together, and the command prints how to resume."""
    import signal
    import time

    from reinforge.training.checkpoint import read_state

    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:8]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    ds = {"path": str(tmp_path / "pairs.json"), "type": "chat_template.default", "field_messages": "conversations",
          "message_property_mappings": {"role": "from", "content": "value"}, "roles": {"user": ["human"], "assistant": ["gpt"]}}
    cfg = {"base_model": str(tiny_model_dir), "rl": "dpo", "datasets": [ds], "sequence_len": 64, "micro_batch_size": 2,
           "max_steps": 100000, "lr_scheduler": "constant", "output_dir": str(tmp_path / "out"), "use_tensorboard": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    err = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([str(BIN / "reinforge"), "train", "run.yaml", "--num-processes", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    log = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    assert proc.wait(timeout=120) == 130
    text = (tmp_path / "stderr.txt").read_text()
    assert text.count("interrupted after step") == 1, text[-3000:]  # printed by process 0 only
    step = int(text.split("interrupted after step ")[1].split(";")[0])
    state = read_state(tmp_path / "out" / f"checkpoint-{step}")
    assert state["world_size"] == 2 and state["position"] == step
    assert (tmp_path / "out" / f"checkpoint-{step}" / "rank_1.pt").exists()
    assert "resume with: reinforge train --num-processes=2 run.yaml resume_from_checkpoint=true" in text


def test_strided_ebft_two_processes_equal_one(tmp_path, tiny_model_dir, monkeypatch):
    """EBFT strided mode: blocks are seeded per micro-batch and document, so two processes of one document each
    sample, reward and train what one process of two documents does (full fine-tune: a frozen feature copy)."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}  # a small function number {i}\n"} for i in range(4)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(tiny_model_dir), "rl": "ebft", "datasets": [{"path": "docs.jsonl", "type": "ebft_pretrain.transform"}],
           "ebft": {"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 3, "n_samples_per_prompt": 2,
                    "feature_layers": [0.5, 1.0], "ce_coef": 0.1},
           "micro_batch_size": 2, "max_steps": 2, "learning_rate": 0.05, "lr_scheduler": "constant", "optimizer": "sgd",
           "sequence_len": 40, "use_tensorboard": False, "seed": 5}
    (tmp_path / "ebft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "ebft.yaml", "output_dir=one"]) == 0
    run_two([str(BIN / "reinforge"), "train", "--num-processes", "2", "ebft.yaml", "output_dir=two", "micro_batch_size=1"],
            tmp_path)
    m = assert_same(tmp_path / "one", tmp_path / "two", ("loss", "ebft/rl_loss", "ebft/ce_loss", "ebft/cfm_loss",
                                                         "ebft/reward", "grad_norm"))
    assert m[0]["grad_norm"] > 0


def test_structured_ebft_with_ce_two_processes_equal_one(tmp_path, tiny_model_dir, monkeypatch):
    """EBFT structured mode with `ce_coef`: the feature-matching rewards are gathered like GRPO's, and each
    process's ground-truth rows (their cross-entropy) are averaged by DDP like the policy loss. Completions from
    the deterministic rollout_func; ground truths of equal length (each process's CE is its own token mean)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dist_rollout.py").write_text(ROLLOUT)
    rows = [{"input": f"Tell me about number {i}.", "output": f"The number is {i}; that is all."} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(tiny_model_dir), "rl": "ebft",
           "datasets": [{"path": "rows.jsonl", "type": "ebft_opencode.transform"}],
           "ebft": {"feature_layers": [0.5, 1.0], "embed_method": "mean_pooling", "ce_coef": 0.5},
           "trl": {"num_generations": 4, "max_completion_length": 5, "rollout_func": "dist_rollout.fixed"},
           "micro_batch_size": 8, "max_steps": 2, "learning_rate": 0.05, "lr_scheduler": "constant", "optimizer": "sgd",
           "use_tensorboard": False}
    (tmp_path / "ebft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "ebft.yaml", "output_dir=one"]) == 0
    run_two([str(BIN / "reinforge"), "train", "--num-processes", "2", "ebft.yaml", "output_dir=two",
             "micro_batch_size=4"], tmp_path)
    m = assert_same(tmp_path / "one", tmp_path / "two", ("loss", "reward", "reward_std", "ebft/cfm_loss",
                                                         "ebft/ce_loss", "ebft/rl_loss", "grad_norm"))
    assert m[0]["ebft/ce_loss"] > 0 and m[0]["grad_norm"] > 0
