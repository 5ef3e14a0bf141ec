"""Real NeMo Gym servers for the tests, started the way a run starts them (`reinforge.nemo_gym.servers`: ng_run from
.venv-gym, created by `make gym`, a prerequisite of `make test`) in the installed wheel's directory.

The single-turn resource server is NeMo Gym's own `example_single_tool_call` (reward 1 when the response calls
get_weather); its data and verifier cases come from the wheel too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

GYM_VENV = ROOT / ".venv-gym"


def gym_site() -> Path:
    """site-packages of .venv-gym: NeMo Gym's directory (resources_servers/, responses_api_*/ ...)."""
    matches = sorted((GYM_VENV / "lib").glob("python3*/site-packages"))
    if not matches or not (matches[0] / "resources_servers").is_dir() or not (GYM_VENV / "bin" / "ng_run").exists():
        pytest.fail(f"NeMo Gym is not installed in {GYM_VENV}: run `make gym` (make test does it)")
    return matches[0]


SERVER = "example_single_tool_call"


def write_resource_config(path: Path, port: int) -> Path:
    """A NeMo Gym config declaring only the example_single_tool_call resource server on `port` (loopback)."""
    path.write_text(yaml.safe_dump({SERVER: {"resources_servers": {SERVER: {
        "entrypoint": "app.py", "domain": "agent", "host": "127.0.0.1", "port": port}}}}))
    return path


def verifier_cases() -> list[dict]:
    return [json.loads(l) for l in (gym_site() / "resources_servers" / SERVER / "tests" / "verifier_cases.jsonl")
            .read_text().splitlines() if l.strip()]


def example_rows() -> list[dict]:
    return [json.loads(l) for l in (gym_site() / "resources_servers" / SERVER / "data" / "example.jsonl")
            .read_text().splitlines() if l.strip()]
