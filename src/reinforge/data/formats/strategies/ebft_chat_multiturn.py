"""Multi-turn chat rows (`messages` or `conversations`, OpenAI roles) for structured EBFT (Axolotl's names):

- `ebft_chat_multiturn.transform`: the messages before the first assistant turn are the prompt, that turn is the
  ground truth, and the messages after it are kept as `remaining_turns`;
- `ebft_chat_multiturn.transform_last_turn`: the whole history before the last assistant turn is the prompt, that
  turn the ground truth;
- `ebft_chat_multiturn.transform_all_turns`: one row per assistant turn (its history as the prompt).

A conversation without an assistant turn is an error naming the row (Axolotl returns an empty ground truth and
trains on it).
"""

from __future__ import annotations

from typing import Any

EXAMPLE = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]}


def _messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    messages = example.get("messages", example.get("conversations"))
    if not isinstance(messages, list) or not messages:
        raise KeyError("messages")
    return messages


def _turns(messages: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], str, int]]:
    """(history before it, content, index) of every assistant turn. Raises ValueError when there is none."""
    turns = [(messages[:i], m["content"], i) for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("the conversation has no assistant turn to use as ground truth")
    return turns


def transform(cfg: Any = None, **kwargs: Any):
    """First assistant turn as ground truth, the rest as `remaining_turns`."""

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        messages = _messages(example)
        history, content, i = _turns(messages)[0]
        return {"prompt": history, "ground_truth": content, "remaining_turns": messages[i + 1:]}

    return transform_fn, {"remove_columns": "__all__"}


def transform_last_turn(cfg: Any = None, **kwargs: Any):
    """Last assistant turn as ground truth, everything before it as the prompt."""

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        history, content, _ = _turns(_messages(example))[-1]
        return {"prompt": history, "ground_truth": content}

    return transform_fn, {"remove_columns": "__all__"}


def transform_all_turns(cfg: Any = None, **kwargs: Any):
    """One row per assistant turn (batched: a conversation becomes several rows)."""

    def transform_fn(examples: dict[str, list[Any]], tokenizer: Any = None) -> dict[str, list[Any]]:
        prompts, truths = [], []
        for i in range(len(next(iter(examples.values())))):
            for history, content, _ in _turns(_messages({k: v[i] for k, v in examples.items()})):
                prompts.append(history)
                truths.append(content)
        return {"prompt": prompts, "ground_truth": truths}

    return transform_fn, {"remove_columns": "__all__", "batched": True}
