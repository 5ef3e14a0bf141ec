"""The `math_env` module the Axolotl RLHF page's rollout-function example names (`math_env.math_solver_rollout`,
`math_env.math_reward`, `math_env.math_transform`), written for reinforge's tests in the page's (Axolotl's) forms:
the rollout takes `(model, processing_class, prompts, generation_config=None)` and returns completion strings."""

from __future__ import annotations

import re


def math_solver_rollout(model, processing_class, prompts, generation_config=None) -> list[str]:
    """One completion per prompt: the prompt's messages through the chat template, then `model.generate`.

    Args:
        model: a transformers causal LM.
        processing_class: its tokenizer.
        prompts: dicts with a `messages` list (or message lists).
        generation_config: passed to `generate` (None: 64 new tokens).
    Returns: completion strings, in the order of `prompts`.
    """
    completions = []
    for prompt in prompts:
        messages = prompt.get("messages", []) if isinstance(prompt, dict) else prompt
        text = processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processing_class(text, return_tensors="pt").to(model.device)
        kwargs = {"generation_config": generation_config} if generation_config is not None else {"max_new_tokens": 64}
        out = model.generate(**inputs, **kwargs)
        completions.append(processing_class.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return completions


def math_reward(prompts, completions, answers=None, **kwargs) -> list[float]:
    """1.0 when the text after `FINAL ANSWER:` equals the row's answer (column `answers` or `answer`), else 0.0."""
    answers = answers if answers is not None else kwargs.get("answer", [None] * len(completions))
    rewards = []
    for completion, correct in zip(completions, answers):
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        match = re.search(r"FINAL ANSWER:\s*(.+)", text)
        rewards.append(1.0 if match and correct is not None and match.group(1).strip() == str(correct) else 0.0)
    return rewards


def math_transform(cfg, *args, **kwargs):
    """GSM8K-style rows (`question`, `answer`) → a one-message prompt and the answer text."""

    def transform_fn(example, processing_class=None):
        return {"prompt": [{"role": "user", "content": example["question"]}], "answer": str(example["answer"])}

    return transform_fn, {"remove_columns": ["question"]}
