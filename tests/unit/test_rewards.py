"""Reward loading (`module.fn` from the working directory, installed modules, built-ins), scoring
(None → NaN, error reports, worker pool with timeout) and the built-in rewards."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from reinforge.rewards import (
    RewardFunctionError,
    RewardLoadError,
    RewardPool,
    format_completions,
    load_reward_funcs,
    score,
)
from reinforge.rewards.extract import extract_answer, extract_gold
from reinforge.rewards.format import format_reward
from reinforge.rewards.length import length_reward
from reinforge.rewards.math import accuracy

GSM8K = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k" / "train.jsonl"

REWARDS_MODULE = '''
import signal
import time

LIMIT = 3


def has_a(prompts, completions, **kwargs):
    """1.0 when the completion contains "a", None (not applicable) when it is empty."""
    return [None if c == "" else float("a" in c) for c in completions]


def uses_column(prompts, completions, completion_ids, answer, **kwargs):
    return [float(len(ids)) + float(a) for ids, a in zip(completion_ids, answer)]


def picky(prompts, completions, **kwargs):
    out = []
    for c in completions:
        if c.startswith("bad"):
            raise ValueError("cannot score this one")
        out.append(1.0)
    return out


def too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def strings(prompts, completions, **kwargs):
    return ["1.0" for _ in completions]


def scalar(prompts, completions, **kwargs):
    return 1.0


def sleepy(prompts, completions, **kwargs):
    if any("sleep" in c for c in completions):
        time.sleep(30)
    return [0.0 for _ in completions]


def alarm_based(prompts, completions, **kwargs):
    """Like Math-Verify: signal.alarm only works in a process's main thread."""
    def handler(signum, frame):
        raise TimeoutError
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(5)
    try:
        return [float(len(c)) for c in completions]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
'''


@pytest.fixture
def reward_dir(tmp_path, monkeypatch, request):
    """A working directory holding a reward module with a name unique to the test."""
    name = "rw_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    (tmp_path / f"{name}.py").write_text(REWARDS_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def ids(n, length=2):
    return [[7] * length for _ in range(n)]


# ---------------------------------------------------------------- loading


def test_load_from_cwd_installed_and_builtin(reward_dir):
    funcs = load_reward_funcs([f"{reward_dir}.has_a", "reinforge.rewards.format.format_reward", "accuracy",
                               "math.accuracy", "length_reward"])
    assert [f.name for f in funcs] == ["has_a", "format_reward", "accuracy", "accuracy", "length_reward"]
    assert funcs[0].fn.__module__ == reward_dir and funcs[0].search_dir == str(Path.cwd())
    assert funcs[2].fn is accuracy and funcs[3].fn is accuracy


def test_cwd_comes_before_installed_modules(tmp_path, monkeypatch):
    site, work = tmp_path / "site", tmp_path / "work"
    site.mkdir()
    work.mkdir()
    (site / "rw_shadowed.py").write_text("def fn(completions, **kw):\n    return ['site'] * len(completions)\n")
    (work / "rw_shadowed.py").write_text("def fn(completions, **kw):\n    return ['cwd'] * len(completions)\n")
    monkeypatch.setattr(sys, "path", list(sys.path) + [str(site)])
    monkeypatch.chdir(work)
    try:
        (f,) = load_reward_funcs(["rw_shadowed.fn"])
        assert f.fn(completions=["x"]) == ["cwd"]
    finally:
        sys.modules.pop("rw_shadowed", None)


def test_load_errors_name_the_string_and_the_cause(reward_dir, tmp_path):
    with pytest.raises(RewardLoadError, match=r"'no_such_module\.fn'.*module 'no_such_module' not found"):
        load_reward_funcs(["no_such_module.fn"])
    with pytest.raises(RewardLoadError, match=rf"'{reward_dir}\.nope'.*has no function 'nope'"):
        load_reward_funcs([f"{reward_dir}.nope"])
    with pytest.raises(RewardLoadError, match=rf"'{reward_dir}\.LIMIT'.*not callable \(it is a int\)"):
        load_reward_funcs([f"{reward_dir}.LIMIT"])
    with pytest.raises(RewardLoadError, match=r"'accurasy': not a 'module\.fn' string and not a built-in"):
        load_reward_funcs(["accurasy"])
    (tmp_path / "rw_broken.py").write_text("import no_such_dependency_xyz\n\ndef fn(**kw):\n    return []\n")
    with pytest.raises(RewardLoadError, match=r"importing module 'rw_broken' failed(.|\n)*no_such_dependency_xyz"):
        load_reward_funcs(["rw_broken.fn"])
    with pytest.raises(RewardLoadError, match="empty"):
        load_reward_funcs([])


# ---------------------------------------------------------------- scoring


def test_none_is_nan_and_columns_are_passed(reward_dir, caplog):
    funcs = load_reward_funcs([f"{reward_dir}.has_a", f"{reward_dir}.uses_column"])
    r = score(funcs, ["p"] * 3, ["abc", "xyz", ""], {"answer": [10, 20, 30]}, completion_ids=[[1], [1, 2], []])
    assert r.shape == (3, 2) and r.dtype == torch.float32
    assert r[:, 0].tolist()[:2] == [1.0, 0.0] and math.isnan(r[2, 0].item())
    assert r[:, 1].tolist() == [11.0, 22.0, 30.0]  # len(completion_ids) + answer
    assert "None from every reward function" not in caplog.text
    (only_a,) = load_reward_funcs([f"{reward_dir}.has_a"])
    r = score([only_a], ["p", "the prompt"], ["a", ""], completion_ids=ids(2))
    assert math.isnan(r[1, 0].item())
    assert "1 of 2 completions got None from every reward function" in caplog.text and "the prompt" in caplog.text


def test_raising_function_reports_function_sample_and_traceback(reward_dir):
    funcs = load_reward_funcs([f"{reward_dir}.picky"])
    long_completion = "bad " + "x" * 1000
    with pytest.raises(RewardFunctionError) as info:
        score(funcs, ["good prompt", "the prompt of the bad one"], ["fine", long_completion], completion_ids=ids(2))
    msg = str(info.value)
    assert "reward function 'picky' raised on completion 1 of 2" in msg
    assert "the prompt of the bad one" in msg and "good prompt" not in msg
    assert "bad xxx" in msg and "more chars]" in msg and "x" * 1000 not in msg  # truncated
    assert "Traceback" in msg and "ValueError: cannot score this one" in msg and f"{reward_dir}.py" in msg


def test_wrong_return_length_or_type(reward_dir):
    with pytest.raises(RewardFunctionError, match="'too_few' returned 1 rewards for 2 completions"):
        score(load_reward_funcs([f"{reward_dir}.too_few"]), ["p"] * 2, ["a", "b"], completion_ids=ids(2))
    with pytest.raises(RewardFunctionError, match="'strings' returned a str for completion 0"):
        score(load_reward_funcs([f"{reward_dir}.strings"]), ["p"], ["a"], completion_ids=ids(1))
    with pytest.raises(RewardFunctionError, match="'scalar' returned a float; expected a list"):
        score(load_reward_funcs([f"{reward_dir}.scalar"]), ["p"], ["a"], completion_ids=ids(1))
    with pytest.raises(ValueError, match="column 'answer' must be a list with one value per completion"):
        score(load_reward_funcs([f"{reward_dir}.has_a"]), ["p"] * 2, ["a", "b"], {"answer": [1]}, completion_ids=ids(2))


def test_worker_pool_matches_in_process_and_reports_errors(reward_dir):
    funcs = load_reward_funcs([f"{reward_dir}.has_a", f"{reward_dir}.alarm_based", "accuracy"])
    prompts = ["q"] * 5
    completions = ["a #### 3", "b 4", "", "aaa \\boxed{5}", "zz"]
    columns = {"answer": ["#### 3", "#### 5", "#### 1", "#### 5", "#### 2"]}
    local = score(funcs, prompts, completions, columns, completion_ids=ids(5))
    with RewardPool(funcs, num_workers=2) as pool:
        pooled = score(funcs, prompts, completions, columns, completion_ids=ids(5), pool=pool, timeout=60)
        again = score(funcs, prompts[:2], completions[:2], {"answer": columns["answer"][:2]}, completion_ids=ids(2),
                      pool=pool)
    torch.testing.assert_close(pooled, local, equal_nan=True)
    torch.testing.assert_close(again, local[:2], equal_nan=True)
    assert local[:, 1].tolist() == [8.0, 3.0, 0.0, 13.0, 2.0]  # the alarm-based function ran
    assert local[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    # an exception inside a worker is reported like one in-process, naming the sample
    with pytest.raises(RewardFunctionError, match=r"'picky' raised on completion 2 of 3(.|\n)*bad one"):
        score(load_reward_funcs([f"{reward_dir}.picky"]), ["p"] * 3, ["x", "y", "bad one"], None, 2,
              completion_ids=ids(3))


def test_worker_pool_timeout_is_an_error_naming_the_function(reward_dir):
    funcs = load_reward_funcs([f"{reward_dir}.sleepy"])
    pool = RewardPool(funcs, num_workers=2)
    with pytest.raises(RewardFunctionError, match=r"'sleepy' timed out after 0.5 s on completions 2\.\.3 of 4"):
        score(funcs, ["p"] * 4, ["a", "b", "c", "sleep"], completion_ids=ids(4), pool=pool, timeout=0.5)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score_lists(["p"], ["a"], ids(1), {})


# ---------------------------------------------------------------- built-ins


def _gsm8k_rows(indices):
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: max(indices) + 1]]
    return [rows[i] for i in indices]


def test_accuracy_on_gsm8k_rows():
    rows = _gsm8k_rows([0, 1, 15])  # answers 72, 10, 448000 (the last written "448,000" in the solution)
    answers = [r["answer"] for r in rows]
    assert [extract_gold(a) for a in answers] == ["72", "10", "448000"]
    cases = [
        (0, "48/2 = 24 in May, so 48 + 24 = 72.\n#### 72", 1.0),    # GSM8K format
        (0, "She sold \\boxed{72} clips.", 1.0),                   # \boxed{}
        (0, "The answer is \\boxed{72}, not 73", 1.0),             # boxed wins over the last number
        (0, "#### 71", 0.0),                                       # wrong
        (1, "0.2 per minute times 50 minutes is 10 dollars", 1.0),  # last number
        (1, "She earned $10.00.", 1.0),                            # 10.00 = 10
        (1, "I do not know", 0.0),                                 # no answer at all
        (2, "The profit is $448,000.", 1.0),                       # thousands separator
        (2, "#### 448,000", 1.0),
        (2, "\\boxed{448{,}000}", 1.0),                            # LaTeX thousands separator
        (2, "\\boxed{448,001}", 0.0),
    ]
    completions = [text for _, text, _ in cases]
    golds = [answers[i] for i, _, _ in cases]
    assert accuracy(completions, answer=golds) == [expected for _, _, expected in cases]
    # conversational completions, and a boxed gold answer under TRL's column name `solution`
    conv = format_completions([[{"role": "user", "content": "q"}]] * 2, ["so \\boxed{\\frac{1}{2}}", "0.5"])
    assert accuracy(conv, solution=["The answer is $\\boxed{\\frac12}$.", "\\boxed{1/2}"]) == [1.0, 1.0]


def test_accuracy_truncated_completion_needs_an_explicit_answer():
    """A completion cut at max_completion_length gets no credit for the number it happened to stop after; an
    explicit `####` or boxed answer still counts."""
    gold = [_gsm8k_rows([1])[0]["answer"]] * 4  # 10
    texts = ["0.2 per minute, and 50 minutes is 10", "0.2 per minute, and 50 minutes is 10", "#### 10", "so \\boxed{10} and"]
    assert accuracy(texts, answer=gold, completion_truncated=[False, True, True, True]) == [1.0, 0.0, 1.0, 1.0]
    assert extract_answer("cut after 10", explicit_only=True) is None


def test_accuracy_not_applicable_and_missing_column():
    # a reference that does not parse to mathematics → None (NaN: not applicable)
    assert accuracy(["#### 3", "#### 3"], answer=["#### ???", ""]) == [None, None]
    with pytest.raises(TypeError, match="'answer'"):
        accuracy(["#### 3"])


def test_extract_answer_order():
    assert extract_answer("x \\boxed{\\frac{1}{2}} then 7") == "\\frac{1}{2}"
    assert extract_answer("steps 3 4\n#### 1,234\nthanks 9") == "1234"
    assert extract_answer("the values 1,000 and 2,500,000") == "2500000"
    assert extract_answer("1,2,3") == "3"  # not a thousands grouping
    assert extract_answer("no numbers") is None


def test_format_reward_cases():
    completions = [
        "reasoning\n#### 72",          # 1: final line #### N
        "reasoning\n#### $1,000.\n\n",  # 1: $, separators, period, trailing blank lines
        "So the answer is \\boxed{72}.",  # 1: ends with a boxed answer and a period
        "$$\\boxed{\\frac{1}{2}}$$",    # 1: boxed, closed by $$
        "#### 72\nsome more text",      # 0: #### is not the last line
        "\\boxed{72} is my guess, or 73",  # 0: text after the boxed answer
        "#### seventy-two",             # 0: not a number
        "the answer is 72",             # 0: no marker
        "\\boxed{72",                   # 0: unbalanced
    ]
    assert format_reward(completions) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    conv = format_completions([[{"role": "user", "content": "q"}]], ["ok\n#### 5"])
    assert conv == [[{"role": "assistant", "content": "ok\n#### 5"}]]
    assert format_reward(conv) == [1.0]


def test_length_reward_cases():
    cids = [[1] * 10, [1] * 50, [1] * 100, [1] * 30]
    truncated = [False, False, True, False]
    # short mode, L = 100: 1 - 10/100 = 0.9, 1 - 50/100 = 0.5; truncated → 0;
    # row 4 has target 20: 1 - |30 - 20|/20 = 0.5
    r = length_reward(["c"] * 4, cids, completion_truncated=truncated, max_completion_length=[100] * 4,
                      target_length=[None, None, None, 20])
    assert r == pytest.approx([0.9, 0.5, 0.0, 0.5])
    assert length_reward(["c"], [[1] * 50], completion_truncated=[False], target_length=[20]) == [0.0]  # ≥ 2T
    with pytest.raises(ValueError, match="completion_truncated"):
        length_reward(["c"], [[1]])
    with pytest.raises(ValueError, match="max_completion_length"):
        length_reward(["c"], [[1]], completion_truncated=[False])


def test_builtins_through_score_with_conversational_prompts():
    prompts = [[{"role": "user", "content": "How many?"}]] * 2
    completions = format_completions(prompts, ["2 + 2 = 4\n#### 4", "I think 5"])
    funcs = load_reward_funcs(["accuracy", "format_reward", "length_reward"])
    r = score(funcs, prompts, completions,
              {"answer": ["#### 4", "#### 4"], "completion_truncated": [False, True], "max_completion_length": [8, 8]},
              completion_ids=[[1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    # accuracy (1, 0); format (1, 0); length: 1 - 2/8 = 0.75, truncated → 0
    assert r.tolist() == [[1.0, 1.0, 0.75], [0.0, 0.0, 0.0]]


def test_format_completions_plain_text():
    assert format_completions(["Q: 1+1="], ["2"]) == ["2"]
    with pytest.raises(ValueError):
        format_completions(["a"], ["b", "c"])

