"""Prompt/completion rows for strided EBFT: `type: ebft_strided_structured.transform` (Axolotl's name).

Input rows: the prompt in `input`, `prompt` or `question` and the completion in `output`, `completion` or `answer`
(the first present, in that order). Output: `prompt` (text) and `ground_truth` (the completion); anchors are placed
in the completion only. Axolotl tokenises and pads here; reinforge tokenises in the loop (no padding).
"""

from __future__ import annotations

from typing import Any

EXAMPLE = {"input": "Write a function that returns the square of x.", "output": "def square(x):\n    return x * x"}


def _first(example: dict[str, Any], names: tuple[str, ...]) -> str:
    for name in names:
        if example.get(name) is not None:
            return str(example[name])
    raise KeyError(names[0])


def transform(cfg: Any = None, **kwargs: Any):
    """The dataset transform: `(transform_fn, {"remove_columns": "__all__"})`; a missing field is a KeyError."""

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        return {"prompt": _first(example, ("input", "prompt", "question")),
                "ground_truth": _first(example, ("output", "completion", "answer"))}

    return transform_fn, {"remove_columns": "__all__"}
