"""Run set-up shared by every loop: output directory policy, accelerator, seeds, logging."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from reinforge.config.schema import ReinforgeConfig


class RunError(RuntimeError):
    """A run that cannot start or continue, with the reason and the fix."""


def prepare_output_dir(cfg: ReinforgeConfig) -> Path:
    """Create `output_dir`; a non-empty one is an error unless `overwrite_output_dir: true` (then emptied)."""
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite_output_dir:
            raise RunError(f"output_dir {out} is not empty; set overwrite_output_dir: true "
                           f"(or pass overwrite_output_dir=true) to replace it, or choose another output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_accelerator(cfg: ReinforgeConfig):
    """accelerate's Accelerator with the configured precision and trackers (TensorBoard under output_dir/runs)."""
    import torch
    from accelerate import Accelerator

    if cfg.fp16 and not torch.cuda.is_available():
        raise RunError("fp16 mixed precision needs a GPU; use bf16: true (or neither) on CPU")
    if cfg.bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        bf16 = bool(cfg.bf16)
    precision = "bf16" if bf16 else "fp16" if cfg.fp16 else "no"
    trackers = ["tensorboard"] if cfg.use_tensorboard else None
    return Accelerator(mixed_precision=precision, log_with=trackers, project_dir=cfg.output_dir)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
