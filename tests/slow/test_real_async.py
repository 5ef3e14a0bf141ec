"""The async GRPO example (Axolotl's full async config, local model and GSM8K) on the real SmolLM2-135M-Instruct
against a real vLLM server started from the same file, shortened to 2 steps of 32-token completions: the
background producer, LoRA sync, streaming scoring, IS correction, off-policy mask, replay and re-roll keys all
run together."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))
from conftest_vllm import Server  # noqa: E402

from conftest import ROOT  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_async_example_real_model_short_run(tmp_path, real_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's dataset path is relative to the checkout
    cfg = yaml.safe_load((ROOT / "examples" / "grpo-async-gsm8k.yaml").read_text())
    cfg["base_model"] = str(real_model_dir)
    server = Server(tmp_path, cfg)
    try:
        out = tmp_path / "out"
        # a process of its own, as a user runs it (the example trains in bf16: accelerate's state is per process)
        proc = subprocess.run([str(Path(sys.executable).parent / "reinforge"), "train",
                               str(ROOT / "examples" / "grpo-async-gsm8k.yaml"), f"base_model={real_model_dir}",
                               f"output_dir={out}", "max_steps=2", "trl.max_completion_length=32",
                               f"trl.vllm_server_port={server.port}", "use_tensorboard=false"],
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=1200)
    finally:
        assert server.stop() == 0
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m] == [1, 2]
    assert [x["sample/staleness_mean"] for x in m] == [0.0, 1.0]  # step 2 trains the rollout prefetched during step 1
    for x in m:
        assert 0.0 <= x["rewards/accuracy/mean"] <= 1.0 and x["completions/max_length"] <= 32
        for key in ("time/rollout_wait", "replay_buffer_size", "skipped_zero_adv_batches", "reroll_buffer_size"):
            assert math.isfinite(x[key]), key
        # the sampler weights come from the trained micro-batches' forwards; 32-token answers are rarely right, so
        # a step whose 4 micro-batches all have zero advantages trains nothing (and logs no sampling metrics)
        if x["skipped_zero_adv_batches"] < 4:
            for key in ("sampling/importance_sampling_ratio/mean", "sampling/sampling_logp_difference/mean"):
                assert math.isfinite(x[key]), key
    assert (out / "adapter_config.json").exists()
