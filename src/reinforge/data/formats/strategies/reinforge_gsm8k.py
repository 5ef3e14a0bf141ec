"""GSM8K (openai/grade-school-math) as GRPO prompts: `type: reinforge_gsm8k.transform`.

Input rows: `{"question": str, "answer": str}` where `answer` is the worked solution ending with
`#### <number>`. Output: `prompt` and `answer` (kept unchanged for reward functions; the reference number
is the text after `####`); `question` is removed. The prompt is a system message asking for short
step-by-step reasoning that ends with `#### <number>`, one worked exchange (`EXAMPLE`, a made-up problem
that is not in GSM8K, as a user and an assistant turn: small models copy a shown format far more reliably
than a described one), then the question as the user message.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "Solve the math problem. Think step by step in a few short lines, and finish with a final line "
    "of the form `#### <number>` that gives only the numeric answer."
)

EXAMPLE = {
    "question": "A baker fills 3 trays with 12 muffins each and sells 20 muffins. How many muffins are left?",
    "answer": "The baker makes 3 * 12 = 36 muffins.\nAfter selling 20, 36 - 20 = 16 muffins are left.\n#### 16",
}


def final_number(answer: str) -> str:
    """The reference number of a GSM8K solution: the text after the last `####`, without commas."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def transform(cfg: Any = None, **kwargs: Any):
    """The dataset transform: returns `(transform_fn, {"remove_columns": ["question"]})`.

    `transform_fn(example, tokenizer=None)` raises KeyError when `question` or `answer` is missing
    and ValueError when `answer` has no `####` line.
    """

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        question, answer = example["question"], example["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError("`question` and `answer` must be text")
        if "####" not in answer:
            raise ValueError("`answer` has no final `#### <number>` line")
        return {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": EXAMPLE["question"]},
                       {"role": "assistant", "content": EXAMPLE["answer"]},
                       {"role": "user", "content": question}],
            "answer": answer,
        }

    return transform_fn, {"remove_columns": ["question"]}


def ebft_transform(cfg: Any = None, **kwargs: Any):
    """GSM8K for structured EBFT (`type: reinforge_gsm8k.ebft_transform`): the question as one user message and the
    worked answer (with its `#### N` line) as `ground_truth`; every original column removed."""

    def transform_fn(example: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
        question, answer = example["question"], example["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError("`question` and `answer` must be text")
        return {"prompt": [{"role": "user", "content": question}], "ground_truth": answer}

    return transform_fn, {"remove_columns": "__all__"}
