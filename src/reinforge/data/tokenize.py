"""Canonical records → token ids: chat templates, prompt/completion split, length handling.

The completion of a conversational record is what the chat template adds after the prompt rendered
with `add_generation_prompt=True`; it is found in token space as the common prefix of the tokenised
prompt and prompt+completion (as TRL 1.16 does). When the two disagree before the end of the prompt
(the template renders the prompt differently, or tokens merge across the boundary) the completion
starts where they diverge; such rows are counted in `TokenizeStats.boundary_merges`.
Templated text is tokenised with `add_special_tokens=False` so that no second BOS is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from reinforge.data.errors import RowError

Strategy = Literal["truncate", "drop", "raise"]
Mode = Literal["keep_start", "keep_end"]


@dataclass
class TokenizeStats:
    """Counts reported after preparation; nothing is dropped or truncated without being counted."""

    rows_in: int = 0
    rows_out: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_completion: int = 0
    boundary_merges: int = 0
    lengths: dict[str, list[int]] = field(default_factory=dict)

    def add_length(self, name: str, n: int) -> None:
        self.lengths.setdefault(name, []).append(n)

    def merge(self, other: "TokenizeStats") -> None:
        for key in ("rows_in", "rows_out", "truncated", "dropped_too_long", "dropped_no_completion", "boundary_merges"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for key, values in other.lengths.items():
            self.lengths.setdefault(key, []).extend(values)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, **kwargs: Any) -> str:
    """The chat-template rendering of `messages` as text (the tokenizer's template, already configured)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_prompt_completions(tokenizer, prompt: Any, completions: list[Any],
                             chat_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[list[int]], bool]:
    """Tokenise a prompt and its completions so that `prompt_ids + completion_ids[i]` is the full sequence.

    Args:
        prompt: message list (conversational) or templated text.
        completions: message lists (assistant continuation) or texts, matching `prompt`'s kind.
    Returns:
        (prompt_ids, [completion_ids...], merged) where `merged` says the prompt alone tokenised
        differently from its prefix inside a full sequence (boundary merge).
    """
    chat_kwargs = chat_kwargs or {}
    if isinstance(prompt, list):
        prompt_ids = _ids(tokenizer, render(tokenizer, prompt, True, **chat_kwargs))
        fulls = [_ids(tokenizer, render(tokenizer, prompt + c, False, **chat_kwargs)) for c in completions]
    else:
        prompt_ids = _ids(tokenizer, prompt)
        fulls = [_ids(tokenizer, prompt + c) for c in completions]
    n = min(common_prefix_length(prompt_ids, f) for f in fulls)
    return prompt_ids[:n], [f[n:] for f in fulls], n < len(prompt_ids)


def fit_length(prompt_ids: list[int], completions: list[list[int]], max_len: int, strategy: Strategy,
               mode: Mode) -> tuple[list[int], list[list[int]], str]:
    """Make every `prompt + completion` at most `max_len` tokens.

    keep_start: the prompt is kept, completions are cut at the end (the row is dropped when the prompt
    alone fills max_len). keep_end: the prompt loses tokens from its start (the completions' ends are
    kept; a completion alone longer than max_len is cut at its start). TRL's keep_end slices each
    sequence independently; reinforge keeps one prompt shared by chosen and rejected instead.
    Returns (prompt_ids, completions, status) with status "ok", "truncated", "dropped_too_long" or
    "dropped_no_completion". Raises RowError with strategy "raise".
    """
    longest = len(prompt_ids) + max(len(c) for c in completions)
    if longest <= max_len:
        return prompt_ids, completions, "ok"
    if strategy == "raise":
        raise RowError("sequence", f"{longest} tokens > sequence_len {max_len} (excess_length_strategy: raise)")
    if strategy == "drop":
        return prompt_ids, completions, "dropped_too_long"
    if mode == "keep_start":
        if len(prompt_ids) >= max_len:
            return prompt_ids, completions, "dropped_no_completion"
        room = max_len - len(prompt_ids)
        return prompt_ids, [c[:room] for c in completions], "truncated"
    longest_completion = max(len(c) for c in completions)
    if longest_completion >= max_len:
        return [], [c[-max_len:] for c in completions], "truncated"
    keep = max_len - longest_completion
    return prompt_ids[len(prompt_ids) - keep:], completions, "truncated"


def tokenize_record(record: dict[str, Any], kind: str, tokenizer, max_len: int, strategy: Strategy, mode: Mode,
                    stats: TokenizeStats, chat_kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One canonical record → token ids (None when the row is dropped; `stats` counts why).

    paired → prompt_ids, chosen_ids, rejected_ids; unpaired → prompt_ids, completion_ids, label;
    prompt → prompt_ids (no length handling beyond the caller's).
    """
    stats.rows_in += 1
    if kind == "prompt":
        stats.rows_out += 1
        return {}
    names = ["chosen", "rejected"] if kind == "paired" else ["completion"]
    prompt_ids, comps, merged = split_prompt_completions(tokenizer, record["prompt"], [record[n] for n in names], chat_kwargs)
    stats.boundary_merges += int(merged)
    for name, ids in zip(names, comps):
        if not ids:
            raise RowError(name, "the completion is empty after tokenisation")
    prompt_ids, comps, status = fit_length(prompt_ids, comps, max_len, strategy, mode)
    if status.startswith("dropped"):
        setattr(stats, status, getattr(stats, status) + 1)
        return None
    stats.truncated += status == "truncated"
    stats.rows_out += 1
    out: dict[str, Any] = {"prompt_ids": prompt_ids}
    stats.add_length("prompt", len(prompt_ids))
    for name, ids in zip(names, comps):
        out[f"{name}_ids"] = ids
        stats.add_length(name, len(ids))
    if kind == "unpaired":
        out["label"] = bool(record["label"])
    return out
