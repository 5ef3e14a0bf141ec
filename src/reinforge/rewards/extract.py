"""Text helpers shared by the built-in rewards: completion text, `\\boxed{}` / `#### N` / last-number
answer extraction. Standard library only (this module is imported in reward worker processes)."""

from __future__ import annotations

import re
from typing import Any

# A number, with optional sign, thousands separators (1,000 or 12,345,678) and decimals.
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(NUMBER)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def completion_text(completion: Any) -> str:
    """The text of one completion as TRL passes it to reward functions.

    A plain string is returned as is; a conversational completion (a list of messages
    `[{"role": "assistant", "content": ...}]`) gives the content of its last message (a list of
    content blocks gives its text blocks joined). Raises TypeError for anything else.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
        if content is None:
            return ""
    raise TypeError(f"a completion must be a string or a list of messages; got {type(completion).__name__}")


def strip_thousands(text: str) -> str:
    """Remove thousands separators between digits: "1,000,000" → "1000000" ("1,2" is left alone)."""
    return _THOUSANDS_RE.sub("", text)


def last_boxed(text: str) -> tuple[str, int] | None:
    """Content of the last `\\boxed{...}` (braces balanced) and the index just after its closing brace.

    Returns None when there is no complete `\\boxed{...}`.
    """
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j], j + 1
        start = text.rfind("\\boxed", 0, start)
    return None


def hash_answer(text: str) -> str | None:
    """GSM8K-style final answer: what follows the last `####` on its line.

    The first number there is returned without thousands separators or `$` ("#### $1,000." → "1000");
    with no number, the stripped rest of the line; None when the text has no `####`.
    """
    pos = text.rfind("####")
    if pos == -1:
        return None
    tail = text[pos + 4:].split("\n", 1)[0].strip()
    match = _NUMBER_RE.search(tail)
    if match:
        return strip_thousands(match.group(0))
    return tail or None


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed; None if there is none."""
    matches = _NUMBER_RE.findall(text)
    return strip_thousands(matches[-1]) if matches else None


def extract_answer(text: str, explicit_only: bool = False) -> str | None:
    """A completion's final answer: the last `\\boxed{...}`, else the `#### N` answer, else (unless
    `explicit_only`) the last number. None when none of these is present."""
    boxed = last_boxed(text)
    if boxed is not None:
        return strip_thousands(boxed[0].strip())
    hashed = hash_answer(text)
    if hashed is not None:
        return hashed
    return None if explicit_only else last_number(text)


def extract_gold(answer: Any) -> str:
    """The reference answer of a dataset row: after the last `####` (GSM8K `answer` column), else
    the content of the last `\\boxed{...}` (MATH-style solutions), else the whole value as text."""
    text = str(answer)
    hashed = hash_answer(text)
    if hashed is not None:
        return hashed
    boxed = last_boxed(text)
    if boxed is not None:
        return strip_thousands(boxed[0].strip())
    return strip_thousands(text.strip())
