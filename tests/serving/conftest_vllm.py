"""A real vLLM server for the tests, started as a user starts it: `reinforge vllm-serve CONFIG` in a subprocess.

The vLLM environment (.venv-vllm) is created by `make vllm` (a prerequisite of `make test`). Each server is
module-scoped; at teardown it is stopped with SIGINT (Ctrl-C), and the test fails if it does not exit cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, build_tiny_model

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `reinforge vllm-serve` process for `config` (a dict); `url` once ready."""

    def __init__(self, directory: Path, config: dict):
        if not VLLM_PYTHON.is_file():
            pytest.fail(f"{VLLM_PYTHON} missing: run `make vllm` (make test does it)")
        self.port = free_port()
        self.config = {**config, "vllm": {**config.get("vllm", {}), "port": self.port, "python": str(VLLM_PYTHON)}}
        self.path = directory / "serve.yaml"
        self.path.write_text(yaml.safe_dump(self.config))
        self.log = directory / "serve.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "reinforge"), "vllm-serve", str(self.path)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        from reinforge.rollout.vllm import VLLMClient, VLLMError

        client = VLLMClient(self.url, timeout=600)
        deadline = time.monotonic() + 600
        try:
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    pytest.fail(f"vLLM server did not start; log:\n{self.log.read_text()[-4000:]}")
                try:
                    client.wait_until_ready(timeout=2)
                    break
                except VLLMError:
                    continue
        finally:
            client.close()

    def stop(self) -> int:
        """Ctrl-C the `reinforge vllm-serve` process; its exit code (it must exit within 90 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"vllm-serve did not stop on SIGINT; log:\n{self.log.read_text()[-3000:]}")
        return self.proc.returncode


@pytest.fixture(scope="session")
def vllm_tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama whose head size (64) vLLM's CPU attention supports."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), hidden=128, heads=2, kv_heads=1)
