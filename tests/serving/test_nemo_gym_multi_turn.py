"""NeMo Gym multi-turn against real servers: a vLLM server (`reinforge vllm-serve` with --served-model-name and the
hermes tool-call parser, tiny random model) behind NeMo Gym's model proxy, the simple_agent and the
example_single_tool_call resource server. Episodes from the agent's /run keep the proxy's token ids and sampler
log-probs (equal to the trainer's own on the base weights); `reinforge train` runs GRPO on them with reward_env.
How an episode with several model calls becomes one sequence (tool tokens out of the loss) is tested on a /run
answer's structure in `test_episode_chains_calls_with_tool_tokens_out_of_the_loss`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from reinforge.cli import main
from reinforge.nemo_gym.multi_turn import MultiTurnSource, episode
from reinforge.nemo_gym.servers import NemoGymServers, free_port
from reinforge.nemo_gym.source import NemoGymSession
from reinforge.rollout.types import SamplingParams

from conftest_nemo_gym import SERVER, example_rows, gym_site
from conftest_vllm import Server, vllm_tiny_model_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.nemo_gym]

SERVED = "smol"
AGENT = f"{SERVER}_simple_agent"


def gym_config(path, vllm_url: str):
    """Resource server + model proxy (to our vLLM server) + simple_agent, all on loopback."""
    path.write_text(yaml.safe_dump({
        SERVER: {"resources_servers": {SERVER: {"entrypoint": "app.py", "domain": "agent", "host": "127.0.0.1",
                                                "port": free_port()}}},
        "policy_model": {"responses_api_models": {"vllm_model": {
            "entrypoint": "app.py", "base_url": f"{vllm_url}/v1", "api_key": "unused", "model": SERVED,
            "return_token_id_information": True, "request_prompt_and_generation_token_ids": False,
            "uses_reasoning_parser": False}}},
        AGENT: {"responses_api_agents": {"simple_agent": {
            "entrypoint": "app.py", "resources_server": {"type": "resources_servers", "name": SERVER},
            "model_server": {"type": "responses_api_models", "name": "policy_model"}}}},
    }))
    return path


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, vllm_tiny_model_dir):
    d = tmp_path_factory.mktemp("tool-server")
    cfg = {"base_model": str(vllm_tiny_model_dir), "rl": "grpo", "datasets": [{"path": "unused.jsonl"}],
           "trl": {"reward_funcs": ["accuracy"]}, "micro_batch_size": 8,
           "vllm": {"dtype": "float32", "max_model_len": 1024, "kv_cache_space": 1,
                    "extra_args": ["--served-model-name", SERVED, "--enable-auto-tool-choice", "--tool-call-parser",
                                   "hermes"]}}
    s = Server(d, cfg)
    yield s
    assert s.stop() == 0


def test_episode_chains_calls_with_tool_tokens_out_of_the_loss():
    """Two model calls: the second prompt extends the first call's sequence by the tool result; that part is in
    the completion with loss mask 0 and no sampler log-prob."""
    answer = {"reward": 1.0, "response": {"incomplete_details": None, "output": [
        {"type": "function_call", "prompt_token_ids": [1, 2], "generation_token_ids": [3, 4],
         "generation_log_probs": [-0.1, -0.2]},
        {"type": "function_call_output", "output": "cold"},
        {"type": "message", "prompt_token_ids": [1, 2, 3, 4, 9, 9], "generation_token_ids": [5],
         "generation_log_probs": [-0.3]}]}}
    ep = episode(answer)
    assert ep.prompt_ids == [1, 2] and ep.completion_ids == [3, 4, 9, 9, 5] and ep.loss_mask == [1, 1, 0, 0, 1]
    assert ep.logprobs[:2] == [-0.1, -0.2] and math.isnan(ep.logprobs[2]) and ep.logprobs[4] == -0.3 and ep.turns == 2
    answer["response"]["output"][2]["prompt_token_ids"] = [1, 7, 3, 4]  # re-rendered history: not one sequence
    assert episode(answer) is None


def test_agent_episodes_keep_proxy_token_ids_and_logprobs(tool_server, vllm_tiny_model_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from reinforge.config.nemo_gym import NemoGymDataset

    class Cfg:
        nemo_gym_datasets = [NemoGymDataset(path="x.jsonl", server_name=SERVER)]
        nemo_gym_path = gym_site()
        nemo_gym_model_name, base_model = None, "tiny"
        nemo_gym_verify_timeout, nemo_gym_run_timeout, nemo_gym_max_concurrency, nemo_gym_multi_turn = 30, 120, 8, True

    config = gym_config(tmp_path / "gym.yaml", tool_server.url)
    rows = [{**r, "prompt": [{"role": "user", "content": "x"}]} for r in example_rows()[:2]]
    with NemoGymServers(gym_site(), [str(config)], head_port=free_port(), timeout=300,
                        log_path=tmp_path / "ng.log") as servers:
        source = MultiTurnSource(NemoGymSession(Cfg, servers))
        out = source(rows, [[0]] * 2, tokenizer=tokenizer, params=SamplingParams(n=2, max_new_tokens=8, temperature=0.7))
        source.close()
    assert out.metrics["nemo_gym/run_errors"] == 0 and out.metrics["nemo_gym/masked"] == 0
    assert all(r in (0.0, 1.0) for r in out.extra["nemo_gym_reward"])
    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model_dir, dtype=torch.float32).eval()
    for p, c, lp, m in zip(out.prompt_ids, out.completion_ids, out.logprobs, out.loss_mask):
        assert 0 < sum(m) <= 8 * out.metrics["nemo_gym/turns_mean"] * 2
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / 0.7
        mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1)
        keep = torch.tensor(m, dtype=torch.bool)
        assert torch.allclose(mine[keep], torch.tensor(lp)[keep], atol=2e-3), (mine, lp)


def test_grpo_multi_turn_async_train_with_reward_env(tool_server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    site = gym_site()
    monkeypatch.chdir(tmp_path)
    config = gym_config(tmp_path / "gym.yaml", tool_server.url)
    head = free_port()
    cfg = {
        "base_model": str(vllm_tiny_model_dir), "rl": "grpo", "chat_template": "tokenizer_default",
        "trl": {"use_vllm": True, "vllm_server_base_url": tool_server.url, "vllm_server_timeout": 60,
                "num_generations": 4, "max_completion_length": 8, "temperature": 0.8,
                "use_data_producer": True, "async_prefetch": True,  # as the seed: episodes produced in a thread
                "reward_funcs": ["axolotl.integrations.nemo_gym.rewards.reward_env"]},
        "plugins": ["axolotl.integrations.nemo_gym.NemoGymPlugin"],
        "nemo_gym_enabled": True, "nemo_gym_dir": str(site), "nemo_gym_config_paths": [str(config)],
        "nemo_gym_head_port": head, "nemo_gym_multi_turn": True, "nemo_gym_verify_timeout": 120,
        "nemo_gym_datasets": [{"path": f"resources_servers/{SERVER}/data/example.jsonl", "server_name": SERVER,
                               "max_samples": 4}],
        "datasets": [{"path": str(site / "resources_servers" / SERVER / "data" / "example.jsonl"),
                      "type": "chat_template", "field_messages": "responses_create_params.input",
                      "message_field_content": "content", "message_field_role": "role"}],
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out"), "use_tensorboard": False, "seed": 3,
    }
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rewards/reward_env/mean" in r]
    assert len(train) == 2
    for r in train:
        assert r["nemo_gym/run_errors"] == 0 and r["nemo_gym/turns_mean"] >= 1 and "time/weight_sync" in r
