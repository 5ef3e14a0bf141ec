"""Metric accumulation over micro-batches/ranks and writing to metrics.jsonl and trackers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


class MetricsAccumulator:
    """Weighted means of scalar metrics over micro-batches: `add({name: value}, weight)`; `means()`."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, Any], weight: float = 1.0) -> None:
        """Add scalar (or tensor: its mean) metrics. A NaN value (undefined for this batch) is skipped but its
        name is still recorded, so that every process reduces the same list of names."""
        for name, value in metrics.items():
            v = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] += 0.0
            self.weights[name] += 0.0
            if math.isnan(v):
                continue
            self.sums[name] += v * weight
            self.weights[name] += weight

    def merge(self, other: "MetricsAccumulator") -> None:
        """Add another accumulator's sums and weights into this one."""
        for name in other.sums:
            self.sums[name] += other.sums[name]
            self.weights[name] += other.weights[name]

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Sums and weights (for a checkpoint)."""
        return {"sums": dict(self.sums), "weights": dict(self.weights)}

    @classmethod
    def from_state(cls, state: dict[str, dict[str, float]] | None) -> "MetricsAccumulator":
        """An accumulator holding `state` (from `state_dict`); empty for None."""
        acc = cls()
        if state:
            acc.sums.update(state["sums"])
            acc.weights.update(state["weights"])
        return acc

    def means(self, accelerator=None) -> dict[str, float]:
        """Weighted means (names without any value left out), reduced across processes when `accelerator`
        runs several (every process must call this)."""
        names = sorted(self.sums)
        if accelerator is not None and accelerator.num_processes > 1:
            from reinforge.training.distributed import all_names

            names = all_names(names)  # a metric may be missing on a process (e.g. no eval rows there)
            t = torch.tensor([[self.sums[n], self.weights[n]] for n in names], dtype=torch.float64,
                             device=accelerator.device).reshape(len(names), 2)
            rows = accelerator.reduce(t, reduction="sum").tolist()
        else:
            rows = [(self.sums[n], self.weights[n]) for n in names]
        return {n: s / w for n, (s, w) in zip(names, rows) if w}


class MetricsWriter:
    """Appends one JSON line per log event to `output_dir/metrics.jsonl` and forwards to accelerate trackers.

    Only the main process writes. `resume_step`: the run continues from a checkpoint of that step, so
    records of later steps (logged before the interruption, and about to be logged again) are removed
    from metrics.jsonl and the earlier ones make up the history.
    """

    def __init__(self, output_dir: str | Path, accelerator, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.history: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            self.history = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
            accelerator.wait_for_everyone()  # every process has read before the main process rewrites
            if accelerator.is_main_process:
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                tmp.replace(self.path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()}}
        self.history.append(record)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.accelerator.log(metrics, step=step)


def versions() -> dict[str, str]:
    """Versions of python and the packages a run depends on (those installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("reinforge", "torch", "transformers", "accelerate", "peft", "datasets", "trl", "deepspeed", "wandb",
                 "mlflow", "trackio", "tensorboard"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_run_info(output_dir: str | Path, info: dict[str, Any]) -> None:
    """Append one JSON line describing a start or resume of the run (versions, processes, command line, ...)
    to `output_dir/run_info.jsonl`; the caller makes sure only the main process calls this."""
    import sys
    import time

    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "versions": versions(), **info}
    with (Path(output_dir) / "run_info.jsonl").open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.key: scalar} (lists/None as strings), as trackers' hparams want."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    out[key] = data if isinstance(data, (int, float, str, bool)) else str(data)
    return out
