"""nvidia/OpenCodeInstruct-style rows for structured EBFT: `type: ebft_opencode.transform` (Axolotl's name).

Input rows: `{"input": str, "output": str}`. Output: `prompt` (the input as one user message) and `ground_truth`
(the output), every original column removed.
"""

from __future__ import annotations

from typing import Any

EXAMPLE = {"input": "Write a function that returns the square of x.", "output": "def square(x):\n    return x * x"}


def transform(cfg: Any = None, **kwargs: Any):
    """The dataset transform: `(transform_fn, {"remove_columns": "__all__"})`; a missing field is a KeyError."""

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": example["input"]}], "ground_truth": example["output"]}

    return transform_fn, {"remove_columns": "__all__"}
