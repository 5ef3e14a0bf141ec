"""Answer accuracy for math problems, checked with Math-Verify (`math-verify` package)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from math_verify import parse, verify

from reinforge.rewards.extract import completion_text, extract_answer, extract_gold

PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5


def accuracy(completions: list[Any], answer: list[Any] | None = None, solution: list[Any] | None = None,
             completion_truncated: list[bool] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 when a completion's final answer equals the reference answer mathematically, else 0.0.

    Reference (per row): the dataset column `answer` (GSM8K: the text after the last `####`, e.g.
    "... #### 72" → 72) or, when there is no `answer` column, `solution` (TRL's name); a value with
    `\\boxed{...}` gives its boxed content, any other value is taken whole.
    Completion answer: the last `\\boxed{...}`, else the text after the last `####`, else the last
    number in the completion — except for a completion cut at max_completion_length
    (`completion_truncated`, passed by the GRPO loop), whose last number is wherever generation stopped:
    without a boxed or `####` answer it scores 0.0. Thousands separators are dropped ("1,000" = 1000).
    Both are parsed and compared with `math_verify.parse` / `math_verify.verify` (so 0.5 = \\frac{1}{2},
    18 = 18.00).

    Args:
        completions: N completions (strings, or message lists for conversational prompts).
        answer / solution: N reference answers (dataset column).
        completion_truncated: N booleans, True when the completion ended without EOS (optional).
    Returns:
        N floats: 1.0 correct, 0.0 wrong or no answer found; None (not applicable → NaN) when the
        reference itself does not parse to a mathematical expression.
    Raises:
        TypeError: neither an `answer` nor a `solution` column is present.

    Math-Verify's own timeouts use `signal.alarm` and therefore work only in a process's main
    thread; off the main thread they are disabled (use `reward_num_workers` > 1 with
    `reward_timeout` to bound run time there).
    """
    golds = answer if answer is not None else solution
    if golds is None:
        raise TypeError("accuracy needs a dataset column 'answer' (GSM8K style '... #### 72') or 'solution'")
    if len(golds) != len(completions):
        raise ValueError(f"accuracy got {len(completions)} completions but {len(golds)} reference answers")
    main_thread = threading.current_thread() is threading.main_thread()
    parse_timeout = PARSE_TIMEOUT_S if main_thread else None
    verify_timeout = VERIFY_TIMEOUT_S if main_thread else None
    if not main_thread:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning, once per call
    rewards: list[float | None] = []
    truncated = completion_truncated or [False] * len(completions)
    for completion, gold, cut in zip(completions, golds, truncated):
        gold_parsed = parse(f"\\boxed{{{extract_gold(gold)}}}", parsing_timeout=parse_timeout)
        if not any(not isinstance(x, str) for x in gold_parsed):  # nothing mathematical in the reference
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion), explicit_only=bool(cut))
        if predicted is None:
            rewards.append(0.0)
            continue
        pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=parse_timeout)
        ok = bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=verify_timeout)
        rewards.append(1.0 if ok else 0.0)
    return rewards
