"""Every config in examples/ passes `reinforge validate`, and the ones no slow test runs train for 2 steps.

Which examples run where:
- slow suite (tests/slow, real SmolLM2-135M): dpo-smollm2, grpo-gsm8k, grpo-async-gsm8k (with a vLLM server),
  ebft-structured-gsm8k, ebft-strided-cpython, nemo-gym-single-turn (with NeMo Gym servers). SLOW_RUN lists them;
  `test_slow_list_is_what_the_slow_tests_run` checks it against the slow tests' source.
- validate only: grpo-gsm8k-vllm (trl.use_vllm: generation needs a `reinforge vllm-serve` server) and
  nemo-gym-multi-turn (a vLLM server and NeMo Gym's agent, model proxy and resource servers); training against
  real servers is covered by tests/serving (test_grpo_vllm.py, test_nemo_gym_multi_turn.py).
- here, 2 steps on the tiny random model (base_model, max_steps, lengths and output_dir overridden, nothing else):
  every other example.
examples/nemo-gym/*.yaml are NeMo Gym server configs (for ng_run), not reinforge configs; the test checks that.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from reinforge.cli import main

from conftest import ROOT

EXAMPLES = ROOT / "examples"
CONFIGS = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
SLOW_RUN = {"dpo-smollm2.yaml", "grpo-gsm8k.yaml", "grpo-async-gsm8k.yaml", "ebft-structured-gsm8k.yaml",
            "ebft-strided-cpython.yaml", "nemo-gym-single-turn.yaml"}
NEEDS_SERVERS = {
    "grpo-gsm8k-vllm.yaml": "trains against a vLLM server (trl.use_vllm); tests/serving/test_grpo_vllm.py",
    "nemo-gym-multi-turn.yaml": "needs a vLLM server and NeMo Gym's agent/proxy/resource servers; "
                                "tests/serving/test_nemo_gym_multi_turn.py",
}
RUN_HERE = [name for name in CONFIGS if name not in SLOW_RUN and name not in NEEDS_SERVERS]


def test_slow_list_is_what_the_slow_tests_run():
    slow = "\n".join(p.read_text() for p in (ROOT / "tests" / "slow").glob("test_*.py"))
    named = {name for name in CONFIGS if re.search(rf"[\"']{re.escape(name)}[\"']", slow)}
    assert named == SLOW_RUN
    assert RUN_HERE, "every example is run elsewhere"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.nemo_gym) if n.startswith("nemo-gym") else n
                                  for n in CONFIGS])  # their data lies in NeMo Gym's install (`make gym`)
def test_example_validates(name, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`reinforge validate` from the repository root (the examples' paths are relative to it), with the real model
    path replaced by the tiny model (models/ exists only after `make model`) and output_dir by an empty one."""
    monkeypatch.chdir(ROOT)
    rc = main(["validate", f"examples/{name}", f"base_model={tiny_model_dir}", f"output_dir={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    resolved = yaml.safe_load(out)
    assert resolved["rl"] == raw["rl"] and resolved["datasets"][0]["path"] == raw["datasets"][0]["path"]


@pytest.mark.parametrize("name", sorted(p.name for p in (EXAMPLES / "nemo-gym").glob("*.yaml")))
def test_nemo_gym_dir_holds_server_configs(name):
    """Each top-level entry is a NeMo Gym server (resources_servers / responses_api_models / responses_api_agents),
    so these files are configs for ng_run, not for reinforge."""
    data = yaml.safe_load((EXAMPLES / "nemo-gym" / name).read_text())
    kinds = {"resources_servers", "responses_api_models", "responses_api_agents"}
    assert data and all(isinstance(v, dict) and set(v) <= kinds and v for v in data.values()), data
    assert "base_model" not in data and "rl" not in data


# Overrides that make a run take seconds; the example's other keys stay as they are.
SHORT = ["max_steps=2", "sequence_len=96", "val_set_size=4", "eval_steps=2", "logging_steps=1",
         "use_tensorboard=false"]


@pytest.mark.parametrize("name", RUN_HERE)
def test_example_trains_two_steps(name, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    extra = []
    if name == "kto-smollm2.yaml":  # also Axolotl's KTO keys: reentrant gradient checkpointing through the kwargs
        extra = ["gradient_checkpointing=true", "gradient_checkpointing_kwargs.use_reentrant=true",
                 "remove_unused_columns=false"]
    rc = main(["train", f"examples/{name}", f"base_model={tiny_model_dir}", f"output_dir={out}", *SHORT, *extra])
    assert rc == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [1, 2], train
    assert all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in train), train  # finite loss, a real gradient
    assert any("eval_loss" in m for m in metrics)
    assert (out / "adapter_config.json").is_file()  # every example here trains a LoRA adapter
