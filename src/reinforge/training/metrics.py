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
        for name, value in metrics.items():
            v = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            if math.isnan(v):
                continue
            self.sums[name] += v * weight
            self.weights[name] += weight

    def means(self, accelerator=None) -> dict[str, float]:
        """Weighted means, reduced across processes when `accelerator` runs several."""
        names = sorted(self.sums)
        if accelerator is not None and accelerator.num_processes > 1:
            t = torch.tensor([[self.sums[n], self.weights[n]] for n in names], dtype=torch.float64,
                             device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            return {n: (s / w if w else float("nan")) for n, (s, w) in zip(names, t.tolist())}
        return {n: self.sums[n] / self.weights[n] for n in names if self.weights[n]}


class MetricsWriter:
    """Appends one JSON line per log event to `output_dir/metrics.jsonl` and forwards to accelerate trackers."""

    def __init__(self, output_dir: str | Path, accelerator) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.history: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()}}
        self.history.append(record)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.accelerator.log(metrics, step=step)


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
