"""Signals sent to a real `reinforge train` process: the first writes a resumable checkpoint, a second stops at once."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reinforge.cli import main
from reinforge.training.checkpoint import is_complete

from conftest import DATA_DIR

REINFORGE = Path(sys.executable).parent / "reinforge"


def config(tmp_path, model_dir):
    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:4]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    ds = {"path": str(tmp_path / "pairs.json"), "type": "chat_template.default", "field_messages": "conversations",
          "message_property_mappings": {"role": "from", "content": "value"}, "roles": {"user": ["human"], "assistant": ["gpt"]}}
    cfg = {"base_model": str(model_dir), "rl": "dpo", "datasets": [ds], "sequence_len": 64, "micro_batch_size": 2,
           "max_steps": 100000, "learning_rate": 1e-3, "lr_scheduler": "constant", "output_dir": str(tmp_path / "out"),
           "use_tensorboard": False}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(tmp_path, cfg):
    err = (tmp_path / "stderr.txt").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([str(REINFORGE), "train", str(cfg)], stdout=subprocess.DEVNULL, stderr=err, env=env,
                            cwd=tmp_path)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # training has started
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)
    return proc


def wait_for(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while text not in path.read_text():
        assert time.time() < deadline, path.read_text()
        time.sleep(0.02)


def test_sigint_writes_checkpoint_and_the_run_resumes(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir)
    proc = start(tmp_path, cfg)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "SIGINT received — finishing the current step, then writing a checkpoint" in err
    m = re.search(r"interrupted after step (\d+); checkpoint written to (\S+)", err)
    assert m, err
    step, path = int(m.group(1)), Path(m.group(2))
    assert path == tmp_path / "out" / f"checkpoint-{step}" and is_complete(path)
    assert f"resume with: reinforge train {cfg} resume_from_checkpoint=true" in err
    logged = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 1))

    assert main(["train", str(cfg), "resume_from_checkpoint=true", f"max_steps={step + 2}"]) == 0
    logged = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 3))
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_second_signal_stops_at_once(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir)
    cfg.write_text(cfg.read_text() + "gradient_accumulation_steps: 4\n")  # longer steps: the second signal comes mid-step
    proc = start(tmp_path, cfg)
    proc.send_signal(signal.SIGTERM)
    wait_for(tmp_path / "stderr.txt", "SIGTERM received")  # the first one was handled
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = (tmp_path / "stderr.txt").read_text()
    assert "stopped at once; no checkpoint was written for the current step" in err
    # whatever the second signal interrupted, nothing incomplete looks like a checkpoint
    for p in (tmp_path / "out").glob("checkpoint-*"):
        assert p.name.endswith(".tmp") or is_complete(p), p
