"""The NeMo Gym single-turn example (Axolotl's seed config with the local model and NeMo Gym's reasoning_gym server)
on the real SmolLM2-135M-Instruct, shortened to 2 steps: the servers are started by hand first, as the seed does
(`ng_run` with the server's resources_only.yaml; here through reinforge's NemoGymServers), and the run reuses them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serving"))
from conftest_nemo_gym import gym_site  # noqa: E402

from conftest import ROOT  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.nemo_gym]


def test_single_turn_example_real_model_short_run(tmp_path, real_model_dir):
    from reinforge.nemo_gym.servers import NemoGymServers, free_port

    head = free_port()
    out = tmp_path / "out"
    with NemoGymServers(gym_site(), ["resources_servers/reasoning_gym/configs/resources_only.yaml"], head_port=head,
                        timeout=300, log_path=tmp_path / "ng.log"):
        proc = subprocess.run([str(Path(sys.executable).parent / "reinforge"), "train",
                               str(ROOT / "examples" / "nemo-gym-single-turn.yaml"), f"base_model={real_model_dir}",
                               f"output_dir={out}", "max_steps=2", "trl.max_completion_length=48",
                               f"nemo_gym_head_port={head}", "use_tensorboard=false"],
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rewards/reward_nemo_gym_verify/mean" in r]
    assert len(train) == 2 and all(r["nemo_gym/verify_errors"] == 0 for r in train)
