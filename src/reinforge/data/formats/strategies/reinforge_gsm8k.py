"""GSM8K (openai/grade-school-math) as GRPO prompts: `type: reinforge_gsm8k.transform`.

Input rows: `{"question": str, "answer": str}` where `answer` is the worked solution ending with
`#### <number>`. Output: `prompt` (a system message asking for step-by-step reasoning that ends with
`#### <number>`, then the question as the user message) and `answer`, kept unchanged for reward
functions (the reference number is the text after `####`). `question` is removed.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "Solve the math problem. Think step by step, showing your reasoning, and finish with a final line "
    "of the form `#### <number>` that gives only the numeric answer."
)

EXAMPLE = {
    "question": "Natalia sold clips to 48 friends in April and half as many in May. How many clips did she sell?",
    "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72",
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
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
            "answer": answer,
        }

    return transform_fn, {"remove_columns": ["question"]}
