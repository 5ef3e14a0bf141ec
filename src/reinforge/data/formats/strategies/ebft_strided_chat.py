"""Chat rows (`messages` / `conversations`) for strided EBFT: `type: ebft_strided_chat.transform` (Axolotl's name).

The history before the last assistant turn is the prompt (rendered with the chat template), that turn's content the
ground truth in which the anchors are placed.
"""

from __future__ import annotations

from typing import Any

from reinforge.data.formats.strategies.ebft_chat_multiturn import EXAMPLE, transform_last_turn

__all__ = ["EXAMPLE", "transform"]


def transform(cfg: Any = None, **kwargs: Any):
    """The dataset transform (as `ebft_chat_multiturn.transform_last_turn`)."""
    return transform_last_turn(cfg, **kwargs)
