"""The `rewards` module the Axolotl RLHF page's GRPO/GDPO examples name (`rewards.rand_reward_func`,
`rewards.oai_gsm8k_transform`, `rewards.format_reward`, `rewards.correctness_reward`, `rewards.accuracy_reward`,
`rewards.prompt_transform`), written for reinforge's tests: the page shows some of them and leaves the others to
the user. Transforms follow Axolotl's form `fn(cfg, *args, **kwargs) -> (transform_fn, {"remove_columns": ...})`;
rewards TRL's `fn(completions, **columns) -> list[float]`."""

from __future__ import annotations

import random
import re


def _text(completion) -> str:
    """A completion as text: a string, or a list of messages whose last one is the answer."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


def _last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "") if numbers else None


def rand_reward_func(completions, **kwargs) -> list[float]:
    """A uniform random reward in [0, 1) per completion (the page's example of a reward function)."""
    return [random.uniform(0.0, 1.0) for _ in completions]


def oai_gsm8k_transform(cfg, *args, **kwargs):
    """openai/gsm8k rows (`question`, `answer` ending in `#### N`) → a one-message prompt and the number N."""

    def transform_fn(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["question"]}],
                "answer": example["answer"].split("####")[-1].strip().replace(",", "")}

    return transform_fn, {"remove_columns": ["question"]}


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for a completion longer than 10 characters, else 0.0 (the page's GDPO example)."""
    return [1.0 if len(_text(c)) > 10 else 0.0 for c in completions]


def correctness_reward(completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the last number of the completion equals the row's `answer`, else 0.0."""
    answers = answer if answer is not None else [None] * len(completions)
    return [1.0 if a is not None and _last_number(_text(c)) == str(a).strip() else 0.0
            for c, a in zip(completions, answers)]


def accuracy_reward(completions, answer=None, **kwargs) -> list[float]:
    """The full async example's reward: the same check as `correctness_reward`."""
    return correctness_reward(completions, answer=answer, **kwargs)


def prompt_transform(cfg, *args, **kwargs):
    """AI-MO/NuminaMath-TIR rows (`problem`, `solution` with a `\\boxed{N}` answer), or GSM8K rows (`question`,
    `answer`), → a one-message prompt and the final answer."""

    def transform_fn(example, tokenizer=None):
        if "problem" in example:
            boxed = re.findall(r"\\boxed\{([^}]*)\}", example["solution"])
            return {"prompt": [{"role": "user", "content": example["problem"]}],
                    "answer": boxed[-1].strip() if boxed else ""}
        return {"prompt": [{"role": "user", "content": example["question"]}],
                "answer": example["answer"].split("####")[-1].strip().replace(",", "")}

    return transform_fn, {"remove_columns": "__all__"}
