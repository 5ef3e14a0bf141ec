"""Saving models atomically: write into a temporary directory, then rename it into place."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from reinforge.config.schema import ReinforgeConfig


def write_config(cfg: ReinforgeConfig, directory: Path) -> None:
    """Write the resolved config as `reinforge_config.yaml` (loadable by `reinforge train`)."""
    (directory / "reinforge_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def save_model(model, tokenizer, cfg: ReinforgeConfig, directory: str | Path) -> Path:
    """Save the adapter (peft) or full model, the tokenizer and the resolved config into `directory`.

    Files are written into `<directory>.tmp` first and moved into place at the end, so an interrupted
    save never leaves a directory that looks complete. Existing files of `directory` that the save
    writes again are replaced; others (metrics.jsonl, runs/) are kept.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp-save")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_config(cfg, tmp)
    directory.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target = directory / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    tmp.rmdir()
    return directory
