"""`passthrough`: rows that already are canonical records (no transformation, only validation)."""

from __future__ import annotations

from typing import Any

from reinforge.config.schema import DatasetConfig
from reinforge.data.formats import check_record, register
from reinforge.data.formats.messages import label_value


@register("passthrough", "paired", example={"prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                                             "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"})
def paired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """`prompt`, `chosen`, `rejected`: all text (used as is) or all message lists."""
    return check_record({k: row.get(k) for k in ("prompt", "chosen", "rejected")}, "paired")


@register("passthrough", "unpaired", example={"prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                                               "completion": "4<|im_end|>", "label": True})
def unpaired(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """`prompt`, `completion` (text or message lists) and a bool `label`."""
    rec = {k: row.get(k) for k in ("prompt", "completion")}
    rec["label"] = label_value(row, ds.field_label or "label")
    return check_record(rec, "unpaired")


@register("passthrough", "prompt", example={"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"})
def prompt(row: dict[str, Any], ds: DatasetConfig) -> dict[str, Any]:
    """`prompt` (text or messages); every other column is kept for reward functions."""
    return check_record(dict(row), "prompt")
