"""NeMo Gym multi-turn against real servers, with LoRA sync as in the seed: a vLLM server (`reinforge vllm-serve` for a
multi-turn LoRA config: runtime LoRA, the hermes tool-call parser, the base model served as `<base_model>-base`)
behind NeMo Gym's model proxy (which asks for `<base_model>`, the policy's name), the simple_agent and the
example_single_tool_call resource server; tiny random model.

- Episodes from the agent's /run keep the proxy's token ids and sampler log-probs, and after a sync those are the
  synced adapter's (equal to the peft policy's own log-probs, not the base model's), version after version.
- Seeded rollouts: the per-episode seed reaches vLLM (same seed → same episodes, another seed → others).
- `reinforge train` runs GRPO with reward_env and vllm_lora_sync for 3 steps; the server ends up serving the last
  synced adapter version under the policy's name.
How an episode with several model calls becomes one sequence (tool tokens out of the loss) is tested on a /run
answer's structure in `test_episode_chains_calls_with_tool_tokens_out_of_the_loss` and on a real agent episode in
`test_two_call_episode_through_the_agent`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from reinforge.cli import main
from reinforge.nemo_gym.multi_turn import MultiTurnSource, episode
from reinforge.nemo_gym.servers import NemoGymError, NemoGymServers, free_port
from reinforge.nemo_gym.source import NemoGymSession
from reinforge.rollout.sync import LoraFileSync
from reinforge.rollout.types import SamplingParams
from reinforge.rollout.vllm import VLLMClient

from conftest_nemo_gym import SERVER, example_rows, gym_site
from conftest_vllm import Server, vllm_tiny_model_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.nemo_gym]

AGENT = f"{SERVER}_simple_agent"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gym_config(path, vllm_url: str, model: str, max_steps: int | None = None):
    """Resource server + model proxy (to our vLLM server, asking for `model`) + simple_agent, all on loopback."""
    agent = {"entrypoint": "app.py", "resources_server": {"type": "resources_servers", "name": SERVER},
             "model_server": {"type": "responses_api_models", "name": "policy_model"}}
    if max_steps:
        agent["max_steps"] = max_steps
    path.write_text(yaml.safe_dump({
        SERVER: {"resources_servers": {SERVER: {"entrypoint": "app.py", "domain": "agent", "host": "127.0.0.1",
                                                "port": free_port()}}},
        "policy_model": {"responses_api_models": {"vllm_model": {
            "entrypoint": "app.py", "base_url": f"{vllm_url}/v1", "api_key": "unused", "model": model,
            "return_token_id_information": True, "request_prompt_and_generation_token_ids": False,
            "uses_reasoning_parser": False}}},
        AGENT: {"responses_api_agents": {"simple_agent": agent}},
    }))
    return path


def multi_turn_cfg(model_dir, site, **over) -> dict:
    """A multi-turn NeMo Gym GRPO config with the seed's LoRA keys (vllm_lora_sync) on the tiny model."""
    cfg = {
        "base_model": str(model_dir), "rl": "grpo", "chat_template": "tokenizer_default",
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": TARGETS,
        "trl": {"use_vllm": True, "vllm_lora_sync": True, "num_generations": 4, "max_completion_length": 8,
                "temperature": 0.8, "reward_funcs": ["axolotl.integrations.nemo_gym.rewards.reward_env"]},
        "plugins": ["axolotl.integrations.nemo_gym.NemoGymPlugin"],
        "nemo_gym_enabled": True, "nemo_gym_dir": str(site), "nemo_gym_auto_start": False,
        "nemo_gym_multi_turn": True,
        "nemo_gym_datasets": [{"path": f"resources_servers/{SERVER}/data/example.jsonl", "server_name": SERVER}],
        "datasets": [{"path": str(site / "resources_servers" / SERVER / "data" / "example.jsonl"),
                      "type": "chat_template", "field_messages": "responses_create_params.input",
                      "message_field_content": "content", "message_field_role": "role"}],
        "micro_batch_size": 4,
        "vllm": {"dtype": "float32", "max_model_len": 1024, "kv_cache_space": 1},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, vllm_tiny_model_dir):
    """`reinforge vllm-serve` of the multi-turn LoRA config: no extra_args, the served names come from the config."""
    d = tmp_path_factory.mktemp("mt-lora-server")
    s = Server(d, multi_turn_cfg(vllm_tiny_model_dir, gym_site()))
    yield s
    assert s.stop() == 0


class Cfg:
    """What NemoGymSession reads from a config (the tests drive the rollout source directly)."""

    nemo_gym_model_name, base_model = None, "tiny"
    nemo_gym_verify_timeout, nemo_gym_run_timeout, nemo_gym_max_concurrency, nemo_gym_multi_turn = 30, 120, 8, True

    def __init__(self, max_concurrency: int = 8):
        from reinforge.config.nemo_gym import NemoGymDataset

        self.nemo_gym_datasets = [NemoGymDataset(path="x.jsonl", server_name=SERVER)]
        self.nemo_gym_path = gym_site()
        self.nemo_gym_max_concurrency = max_concurrency


def peft_policy(model_dir, seed: int):
    """The tiny model with a LoRA adapter whose A and B are random (a trained-looking adapter: ΔW ≠ 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # init_lora_weights=False: A and B both random (log-probs move by ~1 nat on this model)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)).eval()


def sampler_matches(model, out, temperature: float) -> tuple[bool, float]:
    """(every episode's model tokens have the sampler log-probs `model` gives them, the largest difference)."""
    worst = 0.0
    for p, c, lp, m in zip(out.prompt_ids, out.completion_ids, out.logprobs, out.loss_mask):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / temperature
        mine = torch.log_softmax(logits, -1).gather(1, torch.tensor(c).unsqueeze(1)).squeeze(1)
        keep = torch.tensor(m, dtype=torch.bool)
        worst = max(worst, float((mine[keep] - torch.tensor(lp)[keep]).abs().max()))
    return worst < 2e-3, worst


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


def test_proxy_samples_from_the_synced_adapter(lora_server, vllm_tiny_model_dir, tmp_path):
    """The proxy asks for the policy's name; before any sync that name does not exist (the base is `-base`); after
    each LoRA sync under that name, the episodes' sampler log-probs are the synced peft policy's, not the base's."""
    from transformers import AutoModelForCausalLM

    policy = str(vllm_tiny_model_dir)
    client = VLLMClient(lora_server.url, timeout=120)
    assert client.wait_until_ready() == f"{policy}-base"
    sync = LoraFileSync(client, tmp_path / "sync", name=policy)
    config = gym_config(tmp_path / "gym.yaml", lora_server.url, policy)
    rows = [{**r, "prompt": [{"role": "user", "content": "x"}]} for r in example_rows()[:2]]
    base = AutoModelForCausalLM.from_pretrained(vllm_tiny_model_dir, dtype=torch.float32).eval()
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.7)
    with NemoGymServers(gym_site(), [str(config)], head_port=free_port(), timeout=300,
                        log_path=tmp_path / "ng.log") as servers:
        session = NemoGymSession(Cfg(), servers)
        session.check_model_proxies(policy, lora_server.url)
        with pytest.raises(NemoGymError, match="no NeMo Gym model server"):
            session.check_model_proxies(f"{policy}-base", lora_server.url)
        source = MultiTurnSource(session)
        before = source(rows, [[0]] * 2, params=params)  # no adapter under the policy's name yet: 404s, masked
        assert before.metrics["nemo_gym/run_errors"] == 4 and before.metrics["nemo_gym/masked"] == 4
        for version, seed in ((1, 11), (2, 12)):
            model = peft_policy(vllm_tiny_model_dir, seed)
            sync.push(model, version)
            assert client.lora_names() == [policy]
            out = source(rows, [[0]] * 2, params=params)
            assert out.metrics["nemo_gym/run_errors"] == 0 and out.metrics["nemo_gym/masked"] == 0
            assert all(r in (0.0, 1.0) for r in out.extra["nemo_gym_reward"])
            for c, m in zip(out.completion_ids, out.loss_mask):
                assert len(c) == len(m) and 0 < sum(m) <= 8 * out.metrics["nemo_gym/turns_mean"] * 2
            ok, worst = sampler_matches(model, out, 0.7)
            assert ok, f"version {version}: the proxy's log-probs are not the synced adapter's (max diff {worst})"
            assert not sampler_matches(base, out, 0.7)[0], "the proxy sampled the base weights"
            assert not (tmp_path / "sync" / f"reinforge-v{version - 1}").exists()
        source.close()
    client.close()


def test_seeded_episodes_repeat(lora_server, vllm_tiny_model_dir, tmp_path):
    """With a rollout seed every episode's model calls carry a vLLM seed: the same seed gives the same episodes
    (requests one at a time, so vLLM batches them the same way), another seed other ones."""
    policy = str(vllm_tiny_model_dir)
    client = VLLMClient(lora_server.url, timeout=120)
    client.wait_until_ready()
    LoraFileSync(client, tmp_path / "sync", name=policy).push(peft_policy(vllm_tiny_model_dir, 5), 0)
    config = gym_config(tmp_path / "gym.yaml", lora_server.url, policy)
    rows = [{**r, "prompt": [{"role": "user", "content": "x"}]} for r in example_rows()[:2]]
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0)
    with NemoGymServers(gym_site(), [str(config)], head_port=free_port(), timeout=300,
                        log_path=tmp_path / "ng.log") as servers:
        source = MultiTurnSource(NemoGymSession(Cfg(max_concurrency=1), servers))
        a, b, c = (source(rows, [[0]] * 2, params=params, seed=s) for s in (7, 7, 8))
        source.close()
    client.close()
    for out in (a, b, c):
        assert out.metrics["nemo_gym/run_errors"] == 0
    assert a.completion_ids == b.completion_ids and a.prompt_ids == b.prompt_ids
    assert a.completion_ids != c.completion_ids


def test_grpo_multi_turn_lora_sync_train(lora_server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    """The seed's multi-turn keys (LoRA, vllm_lora_sync, async data producer) through `reinforge train`: 3 steps,
    a sync before every rollout; the server serves the last version under the policy's name, from its directory."""
    site = gym_site()
    monkeypatch.chdir(tmp_path)
    policy = str(vllm_tiny_model_dir)
    config = gym_config(tmp_path / "gym.yaml", lora_server.url, policy)
    cfg = multi_turn_cfg(vllm_tiny_model_dir, site, trl={
        "vllm_server_base_url": lora_server.url, "vllm_server_timeout": 60, "vllm_sync_interval": 1,
        "vllm_sync_dir": str(tmp_path / "sync"), "use_data_producer": True, "async_prefetch": True})
    cfg.update({"nemo_gym_auto_start": True, "nemo_gym_config_paths": [str(config)], "nemo_gym_head_port": free_port(),
                "nemo_gym_run_timeout": 120, "nemo_gym_max_turns": 3,
                "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-3,
                "output_dir": str(tmp_path / "out"), "use_tensorboard": False, "seed": 3})
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rewards/reward_env/mean" in r]
    assert len(train) == 3
    for r in train:
        assert r["nemo_gym/run_errors"] == 0 and 1 <= r["nemo_gym/turns_mean"] <= 3 and "time/weight_sync" in r
    cards = httpx.get(f"{lora_server.url}/v1/models").json()["data"]
    adapter = [m for m in cards if m["id"] == policy]
    assert len(adapter) == 1 and adapter[0]["parent"] == f"{policy}-base"
    versions = sorted(p.name for p in (tmp_path / "sync").iterdir())
    assert len(versions) == 1 and adapter[0]["root"] == str((tmp_path / "sync" / versions[0]).resolve())


TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "San Francisco"}}\n</tool_call>'
TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "nemo-gym" / "hermes_tools.jinja"


def forced_tool_call_row() -> dict:
    """The first example row with one earlier exchange in its input (the same get_weather call, its result, an
    answer) and vLLM structured output forcing every model call to that tool call (`metadata.extra_body`, merged by
    the proxy into each chat-completions request). The earlier exchange shows the model the call's tokens, so it
    writes them the way the template renders them (alone, greedy SmolLM2 spells `<tool_call>` as `<`,`t`,`oo`,...
    under the constraint, which the next prompt re-tokenises differently: the calls would not chain)."""
    row = json.loads(json.dumps(example_rows()[0]))
    params = row["responses_create_params"]
    developer, user = params["input"]
    params["input"] = [developer, {"role": "user", "content": "weather in sf?"},
                       {"type": "function_call", "call_id": "call_0", "name": "get_weather",
                        "arguments": '{"city": "San Francisco"}'},
                       {"type": "function_call_output", "call_id": "call_0",
                        "output": '{"city":"San Francisco","weather_description":"cold"}'},
                       {"role": "assistant", "content": "It is cold in San Francisco."}, user]
    params["metadata"] = {"extra_body": json.dumps({"structured_outputs": {"choice": [TOOL_CALL]}})}
    return {**row, "prompt": [user]}


@pytest.mark.slow
def test_two_call_episode_through_the_agent(real_model_dir, tmp_path):
    """A real episode with several model calls: SmolLM2-135M behind the proxy (a Hermes tool template), every call
    forced to call get_weather, the agent bounded to 3 model calls by nemo_gym_max_turns (ng_run's max_steps
    override). The episode is one sequence: each call's generated tokens in the loss with the sampler's log-probs,
    the tool results and turn markers between them out of it."""
    from transformers import AutoTokenizer

    model = str(real_model_dir)
    cfg = multi_turn_cfg(real_model_dir, gym_site())
    for key in ("adapter", "lora_r", "lora_alpha", "lora_target_modules"):
        cfg.pop(key)
    cfg["trl"].pop("vllm_lora_sync")
    cfg["vllm"]["extra_args"] = ["--chat-template", str(TEMPLATE)]
    server = Server(tmp_path, cfg)  # full weights: the base is served under the policy's name
    try:
        config = gym_config(tmp_path / "gym.yaml", server.url, model)
        with NemoGymServers(gym_site(), [str(config)], head_port=free_port(), timeout=300,
                            log_path=tmp_path / "ng.log", max_turns=3) as servers:
            assert [s["max_steps"] for s in servers.declared("responses_api_agents").values()] == [3]
            source = MultiTurnSource(NemoGymSession(Cfg(), servers))
            out = source([forced_tool_call_row()], [[0]], params=SamplingParams(n=2, max_new_tokens=64,
                                                                                 temperature=0.05), seed=1)
            source.close()
    finally:
        assert server.stop() == 0
    assert out.metrics["nemo_gym/run_errors"] == 0 and out.metrics["nemo_gym/non_contiguous_episodes"] == 0
    assert out.metrics["nemo_gym/turns_mean"] == 3  # max_turns: three calls, each a tool call
    assert out.extra["nemo_gym_reward"] == [1.0, 1.0]  # get_weather was called
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    for ids, mask, lps in zip(out.completion_ids, out.loss_mask, out.logprobs):
        runs, start = [], 0  # maximal runs of equal mask values
        for i in range(1, len(mask) + 1):
            if i == len(mask) or mask[i] != mask[start]:
                runs.append((mask[start], tok.decode(ids[start:i])))
                start = i
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        for m, text in runs:
            if m:  # the model's tokens: the call it was made to write, ended by its EOS
                assert text == TOOL_CALL + "<|im_end|>"
            else:  # the environment's: the tool result and the next assistant header
                assert "<tool_response>" in text and "San Francisco" in text and text.endswith("<|im_start|>assistant\n")
        assert all(math.isfinite(lp) for lp, m in zip(lps, mask) if m)
        assert all(math.isnan(lp) for lp, m in zip(lps, mask) if not m)
