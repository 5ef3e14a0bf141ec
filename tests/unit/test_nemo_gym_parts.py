"""NeMo Gym integration without NeMo Gym: config keys and their errors, Axolotl's dataset keys (dotted
field_messages, message_field_role/content, developer role), completions → Responses objects, and the error paths
of /verify (timeout, HTTP 500, malformed answers, mask_sample) against a small local HTTP server; a masked sample
is out of the loss and out of its group's statistics."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from reinforge.config.loader import ConfigError, build_config
from reinforge.nemo_gym.responses import chat_tools, parse_tool_calls, response_object, verify_body
from reinforge.nemo_gym.servers import NemoGymServers, ServerInstance, is_loopback
from reinforge.nemo_gym.source import NemoGymSession, SingleTurnSource, post_json
from reinforge.rollout.types import Completions, SamplingParams

VERIFY = "axolotl.integrations.nemo_gym.rewards.reward_nemo_gym_verify"


def gym_cfg(tmp_path, **over):
    data = tmp_path / "gym" / "resources_servers" / "rs" / "data" / "d.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(json.dumps({"responses_create_params": {"input": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}]}}) for i in range(6)))
    cfg = {"base_model": "m", "rl": "grpo", "trl": {"reward_funcs": [VERIFY], "num_generations": 2},
           "micro_batch_size": 2, "plugins": ["axolotl.integrations.nemo_gym.NemoGymPlugin"],
           "nemo_gym_enabled": True, "nemo_gym_dir": str(tmp_path / "gym"), "nemo_gym_auto_start": False,
           "nemo_gym_datasets": [{"path": "resources_servers/rs/data/d.jsonl", "server_name": "rs", "max_samples": 3}],
           "datasets": [{"path": str(data), "type": "chat_template", "field_messages": "responses_create_params.input",
                         "message_field_content": "content", "message_field_role": "role"}]}
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_seed_keys_validate_with_axolotl_defaults(tmp_path):
    cfg = build_config(gym_cfg(tmp_path, dataset_prepared_path=str(tmp_path / "cache")))
    assert (cfg.nemo_gym_head_port, cfg.nemo_gym_server_timeout, cfg.nemo_gym_verify_timeout,
            cfg.nemo_gym_run_timeout, cfg.nemo_gym_multi_turn) == (11000, 360, 30, 300, False)
    assert cfg.datasets[0].message_property_mappings == {"role": "role", "content": "content"}
    assert (cfg.nemo_gym_auto_clone, cfg.nemo_gym_max_turns) == (None, None)


def _sampled(cfg) -> list[str]:
    return [json.loads(l)["responses_create_params"]["input"][1]["content"]
            for l in open(cfg.datasets[0].path).read().splitlines()]


def test_max_samples_is_a_seeded_random_sample(tmp_path):
    """Axolotl's random.sample of the file's rows, seeded by `seed`: the datasets entry reads a file of those rows
    (in file order), the same for the same seed; all rows when max_samples exceeds them."""
    import random

    over = {"dataset_prepared_path": str(tmp_path / "cache")}
    first = build_config(gym_cfg(tmp_path, seed=5, **over))
    assert first.datasets[0].path.startswith(str(tmp_path / "cache" / "nemo_gym_samples"))
    assert first.datasets[0].split == "train"
    assert _sampled(first) == [f"q{i}" for i in sorted(random.Random(5).sample(range(6), 3))]
    assert _sampled(build_config(gym_cfg(tmp_path, seed=5, **over))) == _sampled(first)
    seeds = {tuple(_sampled(build_config(gym_cfg(tmp_path, seed=s, **over)))) for s in range(8)}
    assert len(seeds) > 1  # the seed chooses the rows (8 seeds giving one 3-of-6 subset: p < 1e-8)
    gym = gym_cfg(tmp_path, **over)
    gym["nemo_gym_datasets"][0]["max_samples"] = 50
    assert _sampled(build_config(gym)) == [f"q{i}" for i in range(6)]
    gym["datasets"][0]["split"] = "train[:2]"
    with pytest.raises(ConfigError, match="both choose rows"):
        build_config(gym)


def test_missing_gym_dir_is_refused_not_cloned(tmp_path):
    from reinforge.nemo_gym.servers import NemoGymError, check_gym_dir

    with pytest.raises(NemoGymError, match="nemo_gym_auto_clone asks to clone.*make gym"):
        check_gym_dir(tmp_path / "Gym", None)
    with pytest.raises(NemoGymError, match="nemo_gym_auto_clone is off"):
        check_gym_dir(tmp_path / "Gym", False)
    check_gym_dir(tmp_path, True)  # present: nothing to do


def test_max_turns_become_agent_max_steps(tmp_path):
    from reinforge.nemo_gym.servers import max_steps_overrides

    (tmp_path / "g.yaml").write_text("rs:\n  resources_servers:\n    rs: {entrypoint: app.py}\n"
                                     "ag:\n  responses_api_agents:\n    simple_agent: {entrypoint: app.py}\n")
    assert max_steps_overrides(["g.yaml"], tmp_path, 3) == ["++ag.responses_api_agents.simple_agent.max_steps=3"]
    assert max_steps_overrides(["g.yaml"], tmp_path, None) == []


def test_episodes_carry_a_vllm_seed_through_the_proxy_metadata():
    from reinforge.nemo_gym.multi_turn import seeded
    from reinforge.rollout.vllm import completion_seed

    body = {"responses_create_params": {"input": "q", "metadata": {"extra_body": '{"top_k": 5}', "k": "v"}}}
    out = seeded(body, 7, 3)
    meta = out["responses_create_params"]["metadata"]
    assert json.loads(meta["extra_body"]) == {"top_k": 5, "seed": completion_seed(7, 3)} and meta["k"] == "v"
    assert body["responses_create_params"]["metadata"]["extra_body"] == '{"top_k": 5}'  # the row is not modified
    assert seeded(body, None, 3) is body


def test_multi_turn_lora_serves_the_base_under_another_name(tmp_path):
    from reinforge.serving.vllm_serve import nemo_gym_args

    env = "axolotl.integrations.nemo_gym.rewards.reward_env"
    mt = dict(nemo_gym_multi_turn=True, adapter="lora", lora_r=8, lora_target_modules=["q_proj"],
              trl={"reward_funcs": [env], "num_generations": 2, "use_vllm": True, "vllm_lora_sync": True})
    cfg = build_config(gym_cfg(tmp_path, **mt))
    assert cfg.nemo_gym_policy_name == "m" and nemo_gym_args(cfg) == [
        "--served-model-name", "m-base", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    full = build_config(gym_cfg(tmp_path, **{**mt, "adapter": None, "nemo_gym_model_name": "pol",
                                             "trl": {**mt["trl"], "vllm_lora_sync": None}}))
    assert nemo_gym_args(full)[:2] == ["--served-model-name", "pol"]
    own = build_config(gym_cfg(tmp_path, **mt, vllm={"extra_args": ["--served-model-name=x", "--tool-call-parser",
                                                                    "llama3_json"]}))
    assert nemo_gym_args(own) == []
    assert nemo_gym_args(build_config(gym_cfg(tmp_path))) == []  # single-turn: nothing
    plain = {k: v for k, v in gym_cfg(tmp_path).items() if not k.startswith("nemo_gym") and k != "plugins"}
    assert build_config(plain).nemo_gym_dir == "~/Gym" and not build_config(plain).nemo_gym_enabled


@pytest.mark.parametrize("over, message", [
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"]}, "not a plugin reinforge knows"),
    ({"nemo_gym_auto_start": True}, "nemo_gym_config_paths is required"),
    ({"nemo_gym_datasets": None}, "nemo_gym_datasets is required"),
    ({"nemo_gym_datasets": [{"path": "/abs/d.jsonl", "server_name": "rs"}]}, "relative to nemo_gym_dir"),
    ({"nemo_gym_datasets": [{"path": "d.jsonl"}]}, "server_name"),
    ({"trl": {"reward_funcs": ["accuracy"], "num_generations": 2}}, "add it to trl.reward_funcs"),
    ({"trl": {"reward_funcs": ["axolotl.integrations.nemo_gym.rewards.reward_env"], "num_generations": 2}},
     "not the reward of single-turn"),
    ({"nemo_gym_multi_turn": True, "trl": {"reward_funcs": ["axolotl.integrations.nemo_gym.rewards.reward_env"],
                                           "num_generations": 2}}, "trl.use_vllm: true"),
    ({"nemo_gym_max_turns": 3}, "nemo_gym_max_turns bounds the model calls of a multi-turn episode"),
    ({"nemo_gym_max_turns": 0, "nemo_gym_multi_turn": True}, "nemo_gym_max_turns"),
    ({"nemo_gym_head_port": 0}, "nemo_gym_head_port"),
    ({"nemo_gym_verify_timeout": 0}, "nemo_gym_verify_timeout"),
    ({"nemo_gym_datasets": [{"path": "d.jsonl", "server_name": "rs", "max_samples": 0}]}, "max_samples"),
    ({"nemo_gym_bogus": 1}, "unknown key `nemo_gym_bogus`"),
])
def test_config_errors(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        build_config(gym_cfg(tmp_path, **over))


def test_chat_template_prompt_reads_dotted_field_and_keeps_the_request(tmp_path, tokenizer):
    from reinforge.data.prepare import prepare_data

    cfg = build_config(gym_cfg(tmp_path))
    data = prepare_data(cfg, tokenizer, use_cache=False)
    assert len(data.train) == 3
    row = data.train[0]
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}  # developer = the system role
    assert row["prompt"][1]["role"] == "user"
    assert row["responses_create_params"]["input"][0]["role"] == "developer"  # the request itself is kept as is


def test_tool_calls_become_function_call_items():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "sf"}}\n</tool_call>'
    message, calls = parse_tool_calls(text)
    assert message == "Let me look." and calls == [{"name": "get_weather", "arguments": '{"city": "sf"}'}]
    resp = response_object(text, {"tools": [{"type": "function", "name": "get_weather"}]}, "m", "r")
    assert [o["type"] for o in resp["output"]] == ["message", "function_call"]
    assert resp["tools"][0]["name"] == "get_weather"
    broken = response_object("<tool_call>{not json</tool_call>", {}, "m", "r")
    assert [o["type"] for o in broken["output"]] == ["message"]  # left as text: the verifier sees no call
    assert chat_tools({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}) == [
        {"type": "function", "function": {"name": "f", "description": "", "parameters": {"type": "object"}}}]
    body = verify_body({"responses_create_params": {"input": "q"}, "prompt": "p", "prompt_ids": [1],
                        "expected": 3}, "x", "m", "r")
    assert set(body) == {"responses_create_params", "expected", "response"}
    with pytest.raises(ValueError, match="responses_create_params"):
        verify_body({"prompt": "p"}, "x", "m", "r")


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("192.0.2.2")


# --- error paths against a local HTTP server ------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answers = {
            "/ok/verify": (200, json.dumps({"reward": 0.5})),
            "/masked/verify": (200, json.dumps({"reward": 1.0, "mask_sample": True, "failure_kind": "judge_unavailable"})),
            "/kind/verify": (200, json.dumps({"reward": 0.0, "failure_kind": "wrong_format"})),
            "/boom/verify": (500, "Internal Server Error"),
            "/html/verify": (200, "<html>not json</html>"),
            "/noreward/verify": (200, json.dumps({"score": 1})),
        }
        if self.path == "/slow/verify":
            time.sleep(2.0)
            status, body = 200, json.dumps({"reward": 1.0})
        else:
            status, body = answers.get(self.path, (404, "no"))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())
        except BrokenPipeError:  # the client gave up (the timeout case)
            pass


@pytest.fixture(scope="module")
def local():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, reward, masked, error", [
    ("ok", 0.5, False, None), ("masked", math.nan, True, None), ("kind", 0.0, False, None),
    ("slow", math.nan, True, "timeout"), ("boom", math.nan, True, "HTTP 500"), ("html", math.nan, True, "not JSON"),
    ("noreward", math.nan, True, "no numeric `reward`"),
])
def test_post_json_outcomes(local, path, reward, masked, error):
    with httpx.Client() as http:
        a = post_json(http, f"{local}/{path}/verify", {"response": {}}, timeout=0.5)
    assert (math.isnan(a.reward) and math.isnan(reward)) or a.reward == reward
    assert a.masked is masked
    assert (a.error is None) if error is None else (error in a.error)


class Policy:
    thread_safe, name = True, "scripted"

    def generate(self, prompt_ids, params, seed=None):
        ids = [[5, 6, 2] for _ in prompt_ids for _ in range(params.n)]
        return Completions(completion_ids=ids, truncated=[False] * len(ids))


def session_on(local, tmp_path, mapping):
    """A session whose resource servers are paths of the local server (`mapping`: name → path)."""
    from reinforge.config.nemo_gym import NemoGymDataset

    class Cfg:
        nemo_gym_datasets = [NemoGymDataset(path="d.jsonl", server_name="ok")]  # rows route by their agent_ref
        nemo_gym_path = tmp_path
        nemo_gym_model_name, base_model = None, "m"
        nemo_gym_verify_timeout, nemo_gym_run_timeout, nemo_gym_max_concurrency, nemo_gym_multi_turn = 0.5, 1, 4, False

    servers = NemoGymServers(tmp_path, [], auto_start=False)
    servers.instances = [ServerInstance(n, "resources_servers", n, f"{local}/{p}") for n, p in mapping.items()]
    return NemoGymSession(Cfg, servers)


def test_failed_verify_masks_counts_and_warns(local, tmp_path, tokenizer, caplog):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "responses_create_params": {"input": "q"},
             "agent_ref": {"type": "resources_servers", "name": name}} for name in ("boom", "ok", "masked", "slow")]
    source = SingleTurnSource(session_on(local, tmp_path, {n: n for n in ("boom", "ok", "masked", "slow")}))
    with caplog.at_level("WARNING"):
        out = source(rows, [[1, 2]] * 4, backend=Policy(), tokenizer=tokenizer, params=SamplingParams(n=2, max_new_tokens=4))
    source.close()
    r = out.extra["nemo_gym_reward"]
    assert [math.isnan(x) for x in r] == [True, True, False, False, True, True, True, True]
    assert r[2] == r[3] == 0.5
    assert [sum(m) for m in out.loss_mask] == [0, 0, 3, 3, 0, 0, 0, 0]
    assert out.metrics["nemo_gym/verify_errors"] == 4 and out.metrics["nemo_gym/masked"] == 6
    assert out.metrics["nemo_gym/failure/judge_unavailable"] == 2
    assert "4 of 8 verify requests failed" in caplog.text and "HTTP 500" in caplog.text


def test_masked_sample_is_out_of_the_loss_and_the_group_statistics(tokenizer):
    """Through the preparer: a NaN reward with an all-zero loss mask has advantage 0, no loss token, and its group's
    other completions are compared among themselves."""
    from reinforge.rewards.nemo_gym import reward_nemo_gym_verify
    from reinforge.rollout.prepare import RolloutPreparer
    from reinforge.rollout.types import Rollout

    values = reward_nemo_gym_verify(["a"] * 4, nemo_gym_reward=[1.0, math.nan, 0.0, 1.0])
    assert values[1] is None
    rewards = torch.tensor([[1.0], [math.nan], [0.0], [1.0]])
    rollout = Rollout(rows=[{"prompt": "p"}], prompt_ids=[[1, 2]] * 4, completion_ids=[[3, 4]] * 4,
                      loss_mask=[[1, 1], [0, 0], [1, 1], [1, 1]], sampler_logps=None, truncated=[False] * 4,
                      texts=["a"] * 4, rewards=rewards, reward_names=["reward_nemo_gym_verify"], policy_version=0,
                      num_generations=4, metrics={"nemo_gym/verify_errors": 1.0})
    batch = RolloutPreparer(tokenizer.pad_token_id, [1.0], scale_rewards="group", aggregation="sum_then_normalize",
                            mask_truncated=False).prepare(rollout, None, None)
    assert batch.advantages[1] == 0 and batch.mask[1].sum() == 0 and batch.mask.sum() == 6
    mean = 2 / 3
    assert batch.advantages[0] > 0 and batch.advantages[2] < 0 and abs(float(batch.advantages[0] + batch.advantages[3]
                                                                              + batch.advantages[2])) < 1e-5
    assert batch.metrics["nemo_gym/verify_errors"] == 1.0 and abs(batch.metrics["reward"] - mean) < 1e-6


def test_passthrough_rewards_need_nemo_gym():
    from reinforge.rewards.nemo_gym import reward_env

    with pytest.raises(ValueError, match="nemo_gym_enabled"):
        reward_env(["a"])


@pytest.mark.parametrize("name", ["nemo-gym-single-turn.yaml", "nemo-gym-multi-turn.yaml"])
def test_examples_validate(name):
    from reinforge.config.loader import load_config

    from conftest import ROOT

    cfg = load_config(ROOT / "examples" / name)
    assert cfg.nemo_gym_enabled and cfg.plugins == ["axolotl.integrations.nemo_gym.NemoGymPlugin"]
    assert cfg.datasets[0].field_messages == "responses_create_params.input"
