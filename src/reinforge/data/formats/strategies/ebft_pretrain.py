"""Plain text documents for strided EBFT: `type: ebft_pretrain.transform` (Axolotl's name).

Input rows: `{"text": str}`. Output: an empty `prompt` and the text as `ground_truth`; the first anchor comes after
`ebft.context_length` tokens.
"""

from __future__ import annotations

from typing import Any

EXAMPLE = {"text": "def add(a, b):\n    return a + b\n"}


def transform(cfg: Any = None, **kwargs: Any):
    """The dataset transform: `(transform_fn, {"remove_columns": "__all__"})`; an empty text is a ValueError."""

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        text = example["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("`text` must be non-empty text")
        return {"prompt": "", "ground_truth": text}

    return transform_fn, {"remove_columns": "__all__"}
