"""NeMo Gym single-turn against real NeMo Gym servers (from .venv-gym): the rewards reinforge reads are what the
resource server's /verify answers, for NeMo Gym's own known-good and known-bad verifier cases; the rollout source
masks nothing when the server answers; and `reinforge train` runs GRPO with the verify reward, starting the servers
itself (ng_run) and stopping them (and Ray) at the end.

One module-scoped set of servers (NemoGymServers, as a run starts them) serves the direct tests; the training run
starts its own on another head port.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import yaml

from reinforge.cli import main
from reinforge.nemo_gym.responses import verify_body
from reinforge.nemo_gym.servers import NemoGymServers, free_port
from reinforge.nemo_gym.source import NemoGymSession, SingleTurnSource, post_json
from reinforge.rollout.types import Completions, SamplingParams

from conftest_nemo_gym import SERVER, example_rows, gym_site, verifier_cases, write_resource_config

pytestmark = pytest.mark.nemo_gym

GOOD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Warsaw"}}\n</tool_call>'
BAD = "I cannot check the weather."


@pytest.fixture(scope="module")
def gym(tmp_path_factory):
    d = tmp_path_factory.mktemp("nemo-gym")
    config = write_resource_config(d / "rs.yaml", free_port())
    servers = NemoGymServers(gym_site(), [str(config)], head_port=free_port(), timeout=300, log_path=d / "ng.log")
    with servers:
        yield servers
    with pytest.raises(httpx.HTTPError):  # stopped: the head server no longer answers
        httpx.get(f"{servers.head_url}/server_instances", timeout=3)


def test_discovery_lists_the_resource_server_on_loopback(gym):
    rs = gym.resources_server(SERVER)
    assert rs.kind == "resources_servers" and rs.url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{gym.head_url}/server_instances", timeout=5).status_code == 200


def test_rewards_equal_what_verify_answers_for_the_verifier_cases(gym):
    """For each verifier case of the server: the case's own request and reinforge's request built from the same
    completion text get the same answer, the expected one (1.0 for the get_weather call, 0.0 for plain text)."""
    url = f"{gym.resources_server(SERVER).url}/verify"
    texts = {"full_reward": GOOD, "zero_reward": BAD}
    checked = 0
    with httpx.Client() as http:
        for case in verifier_cases():
            if case["kind"] not in texts:
                continue
            direct = http.post(url, json=case["request"], timeout=30).json()["reward"]
            row = {"responses_create_params": case["request"]["responses_create_params"], "prompt": "unused"}
            ours = post_json(http, url, verify_body(row, texts[case["kind"]], "tiny", "t"), 30)
            assert ours.error is None and not ours.masked
            assert ours.reward == direct == case["expected_reward"]
            checked += 1
    assert checked == 2


def test_malformed_case_is_an_error_not_a_zero(gym):
    """The verifier case without a response: HTTP 422, which reinforge counts as a failed (masked) sample."""
    url = f"{gym.resources_server(SERVER).url}/verify"
    case = next(c for c in verifier_cases() if c["kind"] == "malformed")
    with httpx.Client() as http:
        answer = post_json(http, url, case["request"], 30)
    assert answer.masked and math.isnan(answer.reward) and "HTTP 422" in answer.error


class ScriptedPolicy:
    """Stands in for the policy (not for NeMo Gym): returns given completions' token ids for every prompt."""

    thread_safe, name = True, "scripted"

    def __init__(self, ids: list[list[int]]):
        self.ids = ids

    def generate(self, prompt_ids, params, seed=None):
        ids = [self.ids[j % len(self.ids)] for _ in prompt_ids for j in range(params.n)]
        return Completions(completion_ids=ids, truncated=[False] * len(ids), logprobs=[[-1.0] * len(c) for c in ids])


def test_single_turn_source_rewards_match_verify(gym, tokenizer):
    """Example rows of the server (developer message and tools kept) with a get_weather call and a plain answer:
    rewards 1 and 0 in `nemo_gym_reward`, nothing masked, no verify errors."""
    from reinforge.config.nemo_gym import NemoGymDataset

    class Cfg:  # the NeMo Gym keys a session reads
        nemo_gym_datasets = [NemoGymDataset(path="x.jsonl", server_name=SERVER)]
        nemo_gym_path = gym_site()
        nemo_gym_model_name, base_model = None, "tiny"
        nemo_gym_verify_timeout, nemo_gym_run_timeout, nemo_gym_max_concurrency, nemo_gym_multi_turn = 30, 30, 8, False

    rows = [{**r, "prompt": [{"role": "system", "content": r["responses_create_params"]["input"][0]["content"]},
                             {"role": "user", "content": r["responses_create_params"]["input"][1]["content"]}]}
            for r in example_rows()[:2]]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in (GOOD, BAD)]
    source = SingleTurnSource(NemoGymSession(Cfg, gym))
    prompt_ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in rows]
    out = source(rows, prompt_ids, backend=ScriptedPolicy(ids), tokenizer=tokenizer,
                 params=SamplingParams(n=2, max_new_tokens=32))
    source.close()
    assert out.extra["nemo_gym_reward"] == [1.0, 0.0, 1.0, 0.0]
    assert all(all(m == 1 for m in row) for row in out.loss_mask)
    assert out.metrics["nemo_gym/verify_errors"] == 0 and out.metrics["nemo_gym/masked"] == 0


def train_config(tmp_path, model_dir, head: int, server_name: str = SERVER) -> dict:
    site = gym_site()
    rs = write_resource_config(tmp_path / "rs.yaml", free_port())
    data = site / "resources_servers" / SERVER / "data" / "example.jsonl"
    return {
        "base_model": str(model_dir), "rl": "grpo", "chat_template": "tokenizer_default",
        "trl": {"use_vllm": False, "num_generations": 4, "max_completion_length": 8, "temperature": 0.9,
                "reward_funcs": ["axolotl.integrations.nemo_gym.rewards.reward_nemo_gym_verify"]},
        "plugins": ["axolotl.integrations.nemo_gym.NemoGymPlugin"],
        "nemo_gym_enabled": True, "nemo_gym_dir": str(site), "nemo_gym_auto_start": True,
        "nemo_gym_config_paths": [str(rs)], "nemo_gym_head_port": head, "nemo_gym_server_timeout": 300,
        "nemo_gym_datasets": [{"path": f"resources_servers/{SERVER}/data/example.jsonl", "server_name": server_name,
                               "max_samples": 4}],
        "datasets": [{"path": str(data), "type": "chat_template", "field_messages": "responses_create_params.input",
                      "message_field_content": "content", "message_field_role": "role"}],
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out"), "use_tensorboard": False, "seed": 3,
    }


def test_failed_run_still_stops_the_servers_it_started(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A server name NeMo Gym does not have: the first rollout stops the run with an error listing the servers
    there are, and the servers reinforge started are stopped all the same."""
    monkeypatch.chdir(tmp_path)
    head = free_port()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(train_config(tmp_path, tiny_model_dir, head, server_name="no_such_server")))
    assert main(["train", str(path)]) != 0
    assert "no resource server 'no_such_server'" in capsys.readouterr().err
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{head}/server_instances", timeout=3)


def test_grpo_train_with_verify_reward_starts_and_stops_nemo_gym(tiny_model_dir, tmp_path, monkeypatch):
    """`reinforge train` with the single-turn seed keys (Axolotl's names): ng_run is started in nemo_gym_dir, every
    completion is verified (no errors), the reward is logged under its name, and the servers are gone after."""
    monkeypatch.chdir(tmp_path)
    head = free_port()
    cfg = train_config(tmp_path, tiny_model_dir, head)
    path = tmp_path / "gym.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rewards/reward_nemo_gym_verify/mean" in r]
    assert len(train) == 2
    for r in train:
        assert r["nemo_gym/verify_errors"] == 0 and r["nemo_gym/masked"] == 0
        assert 0.0 <= r["rewards/reward_nemo_gym_verify/mean"] <= 1.0
    assert "Uvicorn running" in (tmp_path / "out" / "nemo_gym.log").read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{head}/server_instances", timeout=3)
