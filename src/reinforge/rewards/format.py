"""Format reward: does the completion end with a recognisable final answer?"""

from __future__ import annotations

import re
from typing import Any

from reinforge.rewards.extract import NUMBER, completion_text, last_boxed

# Last non-empty line: "#### N" (optional $, thousands separators, decimals, a trailing period).
_FINAL_HASH_RE = re.compile(r"(?:^|\n)[ \t]*####[ \t]*\$?" + NUMBER + r"[ \t]*\.?\s*\Z")
# What may follow a closing \boxed{...}: whitespace, $ / $$, \] or \), a period.
_AFTER_BOXED_RE = re.compile(r"(?:\s|\$|\.|\\\]|\\\))*\Z")


def has_final_answer(text: str) -> bool:
    """True when `text` ends with a final answer in one of two forms:

    - its last non-empty line is `#### N`, N a number (optional sign, `$`, thousands separators,
      decimals; a trailing period allowed), as GSM8K's reference solutions end;
    - it ends with a complete `\\boxed{...}` (balanced braces), followed by nothing but whitespace,
      `$`, `\\]`, `\\)` or a period.
    """
    if _FINAL_HASH_RE.search(text):
        return True
    boxed = last_boxed(text)
    return boxed is not None and _AFTER_BOXED_RE.match(text, boxed[1]) is not None


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for each completion that ends with a recognisable final answer (`has_final_answer`:
    a last line `#### N`, or a closing `\\boxed{...}`), else 0.0.

    Args:
        completions: N completions (strings or message lists; the last message's content is checked).
    Returns:
        N floats in {0.0, 1.0}. It checks the form only, not whether the answer is right.
    """
    return [1.0 if has_final_answer(completion_text(c)) else 0.0 for c in completions]
