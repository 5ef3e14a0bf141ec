"""Write docs/config.md: every config key with its type, default and description, from the schema.

Run `python scripts/config_reference.py` after changing the schema; tests/unit/test_config_docs.py
fails when the file is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from reinforge.config.ebft import EBFTConfig
from reinforge.config.nemo_gym import NemoGymDataset
from reinforge.config.schema import DatasetConfig, GradientCheckpointingKwargs, ReinforgeConfig, TRLConfig
from reinforge.config.vllm import VLLMServerConfig

OUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _type(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def table(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=False)) if f.default_factory is None else "(section)"
        rows.append(f"| `{prefix}{name}` | {_type(f.annotation)} | {default.replace('|', chr(92) + '|')} | {f.description or ''} |")
    return rows


def render() -> str:
    parts = [
        "# Configuration reference",
        "",
        "Generated from the pydantic schema by `scripts/config_reference.py`; do not edit by hand.",
        "Every section forbids unknown keys: a misspelt key is an error naming the closest valid key.",
        "",
        "## Top level",
        "",
        *table(ReinforgeConfig),
        "",
        "## `datasets[]` / `test_datasets[]`",
        "",
        *table(DatasetConfig),
        "",
        "## `nemo_gym_datasets[]`",
        "",
        *table(NemoGymDataset, "nemo_gym_datasets[]."),
        "",
        "## `gradient_checkpointing_kwargs:`",
        "",
        *table(GradientCheckpointingKwargs, "gradient_checkpointing_kwargs."),
        "",
        "## `trl:`",
        "",
        *table(TRLConfig, "trl."),
        "",
        "## `vllm:` (the server `reinforge vllm-serve` starts)",
        "",
        *table(VLLMServerConfig, "vllm."),
        "",
        "## `ebft:` (rl: ebft)",
        "",
        *table(EBFTConfig, "ebft."),
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
