"""GRPO through a real vLLM server (tiny random model): generation and sampler log-probs, LoRA-synced end-to-end
training with importance-sampling metrics, full-weight sync with exact resume, and a server that dies mid-run.

One server serves the whole module (`reinforge vllm-serve`, runtime LoRA enabled); the LoRA test runs before
the full-weight tests, which overwrite the server's base weights (each run syncs its weights before its first
rollout). The last test stops the server with Ctrl-C in the middle of a run.
"""

import json
import math

import pytest
import torch
import yaml

import reinforge.rollout.producer as producer_mod
from reinforge.cli import main

from conftest_vllm import Server, free_port, vllm_tiny_model_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.vllm

REWARDS = '''
import os


def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def even_tokens_logged(prompts, completions, completion_ids, **kwargs):
    """even_tokens; appends the number of completions of each call to $CHUNK_LOG."""
    with open(os.environ["CHUNK_LOG"], "a") as f:
        f.write(f"{len(completion_ids)}\\n")
    return even_tokens(prompts, completions, completion_ids)
'''


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, vllm_tiny_model_dir):
    d = tmp_path_factory.mktemp("tiny-server")
    cfg = {"base_model": str(vllm_tiny_model_dir), "rl": "grpo", "adapter": "lora", "lora_r": 8,
           "lora_target_linear": True, "datasets": [{"path": "unused.jsonl"}], "trl": {"reward_funcs": ["accuracy"]}, "micro_batch_size": 8,
           "vllm": {"dtype": "float32", "max_model_len": 512, "kv_cache_space": 1}}
    s = Server(d, cfg)
    yield s
    assert s.stop() == 0


def write_run(tmp_path, model_dir, url, **extra):
    (tmp_path / "vllm_rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"Write something about topic {i}."}]} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # no top_k: the sampler log-probs are then of the same distribution as the trainer's (temperature only)
    trl = {"num_generations": 4, "max_completion_length": 8, "reward_funcs": ["vllm_rewards.even_tokens"],
           "use_vllm": True, "vllm_server_base_url": url, "vllm_server_timeout": 60, **extra.pop("trl", {})}
    cfg = {"base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": str(tmp_path / "prompts.jsonl")}],
           "trl": trl, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-2,
           "lr_scheduler": "constant", "output_dir": str(tmp_path / extra.pop("name", "out")), "use_tensorboard": False,
           "seed": 5, **extra}
    path = tmp_path / f"{cfg['output_dir'].rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_generation_returns_ids_and_processed_sampler_logprobs(tiny_server, vllm_tiny_model_dir, tokenizer):
    """Token ids and log-probs come back per completion; the log-probs are of the processed distribution: the
    trainer's own log-probs at the same temperature agree with them on the base weights (float32 on both sides)."""
    from transformers import AutoModelForCausalLM

    from reinforge.rollout.types import SamplingParams
    from reinforge.rollout.vllm import VLLMClient, VLLMServerBackend

    client = VLLMClient(tiny_server.url)
    client.wait_until_ready()
    backend = VLLMServerBackend(client)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in ("Hello there.", "What is two plus two?")]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.7)
    out = backend.generate(ids, params, seed=11)
    again = backend.generate(ids, params, seed=11)
    assert len(out.completion_ids) == 6 and out.completion_ids == again.completion_ids  # seeded: reproducible
    assert out.completion_ids != backend.generate(ids, params, seed=12).completion_ids
    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model_dir, dtype=torch.float32).eval()
    for i, (c, lp, trunc) in enumerate(zip(out.completion_ids, out.logprobs, out.truncated)):
        assert len(lp) == len(c) and all(v <= 0.0 for v in lp)
        assert trunc == (len(c) == 12 and c[-1] != tokenizer.eos_token_id)
        p = ids[i // 3]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / 0.7
        mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1)
        assert torch.allclose(mine, torch.tensor(lp), atol=2e-3), (mine, lp)


def test_grpo_with_lora_sync_end_to_end(tiny_server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_run(tmp_path, vllm_tiny_model_dir, tiny_server.url, adapter="lora", lora_r=8, lora_target_linear=True,
                    trl={"log_completions": True})
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path / "out")
    assert len(m) == 3
    for key in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max", "time/weight_sync", "reward", "loss", "grad_norm"):
        assert all(key in x and math.isfinite(x[key]) for x in m if "reward" in x), key
    # same weights on both sides (float32): the sampler and the trainer agree closely, the ratio is ~1
    assert all(x["sampling/sampling_logp_difference/max"] < 0.05 for x in m if "reward" in x)
    assert all(0.9 < x["sampling/importance_sampling_ratio/mean"] < 1.1 for x in m if "reward" in x)
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert not list((tmp_path / "out").glob("reinforge-v*"))  # adapter versions live in the sync directory


class Crash(RuntimeError):
    pass


def test_grpo_full_weights_crash_then_resume_matches(tiny_server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    """Full fine-tuning synced to the server (safetensors through the worker extension). A run that crashes while
    producing its third rollout resumes from checkpoint-2 and ends with the uninterrupted run's curves: the
    server is synced with the checkpoint's weights and the seeded requests sample the same completions."""
    monkeypatch.chdir(tmp_path)
    full = write_run(tmp_path, vllm_tiny_model_dir, tiny_server.url, name="full", gradient_accumulation_steps=1,
                     max_steps=4, save_steps=2)
    assert main(["train", str(full)]) == 0
    produce, calls = producer_mod.RolloutProducer.produce, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash("simulated crash")
        return produce(self, *args, **kwargs)

    monkeypatch.setattr(producer_mod.RolloutProducer, "produce", crashing)
    resumed = write_run(tmp_path, vllm_tiny_model_dir, tiny_server.url, name="resumed", gradient_accumulation_steps=1,
                        max_steps=4, save_steps=2)
    with pytest.raises(Crash):
        main(["train", str(resumed)])
    monkeypatch.setattr(producer_mod.RolloutProducer, "produce", produce)
    assert main(["train", str(resumed), "resume_from_checkpoint=true"]) == 0
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["completions/mean_length"] == y["completions/mean_length"], (x, y)
        for key in ("loss", "grad_norm", "sampling/importance_sampling_ratio/mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("depth, max_staleness, staleness, dropped", [
    (1, None, [0, 1, 1, 1], [0, 0, 0, 0]),
    (2, None, [0, 1, 2, 2], [0, 0, 0, 0]),
    (2, 1, [0, 1, 0, 0], [0, 0, 1, 1]),
])
def test_async_prefetch_end_to_end(tiny_server, vllm_tiny_model_dir, tmp_path, monkeypatch, depth, max_staleness,
                                   staleness, dropped):
    """`reinforge train` with async prefetch against the server (full weights synced every step): rollouts are
    produced in a background thread while the previous one trains. With depth d the rollout trained at step s was
    sampled min(s - 1, d) versions earlier (a sync waits for the rollouts in flight, so depth 2 keeps two rollouts
    of one version in flight); `max_staleness` drops older ones and samples them again from the current weights."""
    monkeypatch.chdir(tmp_path)
    trl = {"use_data_producer": True, "async_prefetch": True, "prefetch_depth": depth}
    if max_staleness is not None:
        trl["max_staleness"] = max_staleness
    cfg = write_run(tmp_path, vllm_tiny_model_dir, tiny_server.url, max_steps=4, trl=trl)
    assert main(["train", str(cfg)]) == 0
    m = metrics(tmp_path / "out")
    assert [x["sample/staleness_mean"] for x in m] == staleness
    assert [x["sample/staleness_max"] for x in m] == staleness
    assert [x["sample/dropped_stale_total"] for x in m] == dropped
    for x in m:
        assert x["time/rollout_wait"] >= 0 and math.isfinite(x["sampling/importance_sampling_ratio/mean"])
        assert math.isfinite(x["loss"]) and x["grad_norm"] > 0
    # the policy moved between sampling and training: the correction sees it (same weights: ratio exactly ~1)
    stale_steps = [x for x, s in zip(m, staleness) if s > 0]
    assert max(x["sampling/sampling_logp_difference/max"] for x in stale_steps) > 0.05


def test_streaming_scores_groups_as_they_finish(tiny_server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    """streaming_partial_batch: the reward function sees one finished group (4 completions) per call instead of the
    rollout's 8, and the run's numbers equal the non-streaming run's (same seeded requests, same rewards)."""
    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, streaming in (("whole", False), ("streamed", True)):
        monkeypatch.setenv("CHUNK_LOG", str(tmp_path / f"{name}.log"))
        trl = {"use_data_producer": True, "async_prefetch": True, "streaming_partial_batch": streaming,
               "streaming_min_groups": 1, "reward_funcs": ["vllm_rewards.even_tokens_logged"]}
        cfg = write_run(tmp_path, vllm_tiny_model_dir, tiny_server.url, name=name, max_steps=2, trl=trl)
        assert main(["train", str(cfg)]) == 0
        runs[name] = metrics(tmp_path / name)
        runs[name + "_chunks"] = (tmp_path / f"{name}.log").read_text().split()
    assert set(runs["whole_chunks"]) == {"8"} and set(runs["streamed_chunks"]) == {"4"}  # 2 prompts × 4 per rollout
    for x, y in zip(runs["whole"], runs["streamed"], strict=True):
        assert x["reward"] == y["reward"] and x["completions/mean_length"] == y["completions/mean_length"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)


def test_server_stopped_mid_run_leaves_a_checkpoint(tiny_server, vllm_tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C on `reinforge vllm-serve` stops the server cleanly (exit 0); the trainer, at its next rollout,
    stops with the endpoint in the message and a checkpoint of the last completed step. Runs last: the server is gone."""
    monkeypatch.chdir(tmp_path)
    cfg = write_run(tmp_path, vllm_tiny_model_dir, tiny_server.url, gradient_accumulation_steps=1, max_steps=4)
    produce, calls = producer_mod.RolloutProducer.produce, {"n": 0}

    def stop_server_first(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            assert tiny_server.stop() == 0
        return produce(self, *args, **kwargs)

    monkeypatch.setattr(producer_mod.RolloutProducer, "produce", stop_server_first)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "generation failed at step 3" in err and tiny_server.url in err and "checkpoint of step 2" in err, err
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_unreachable_server_is_a_clear_error(vllm_tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    cfg = write_run(tmp_path, vllm_tiny_model_dir, url, trl={"vllm_server_timeout": 3})
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert url in err and "did not answer within 3 s" in err and "reinforge vllm-serve" in err
