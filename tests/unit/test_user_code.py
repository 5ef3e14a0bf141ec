"""The one-line summary of an error in the user's code (`what`), with the traceback kept in `detail`, whether the
reward function runs in this process or in a worker pool."""

import textwrap

import pytest

from reinforge.rewards import RewardFunctionError, RewardPool, load_reward_func, score
from reinforge.user_code import UserCodeError, debug_enabled, describe_exception

REWARDS = '''
def picky(prompts, completions, **kwargs):
    if any("bad" in c for c in completions):
        raise KeyError("answer")
    return [1.0 for _ in completions]
'''


@pytest.fixture
def picky(tmp_path, monkeypatch):
    (tmp_path / "uc_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.chdir(tmp_path)
    return load_reward_func("uc_rewards.picky", cwd=tmp_path)


def _score(funcs, **kw):
    return score(funcs, ["p", "p"], ["fine", "bad one"], completion_ids=[[1], [2]], **kw)


def test_in_process_error_names_the_configured_function_and_exception(picky):
    with pytest.raises(RewardFunctionError) as info:
        _score([picky])
    err = info.value
    assert err.what == "reward function uc_rewards.picky raised KeyError('answer')"
    assert "raised on completion 1 of 2" in str(err) and "Traceback" in err.detail and "bad one" in err.detail


def test_pool_error_names_the_configured_function_and_exception(picky):
    with RewardPool([picky], num_workers=2) as pool, pytest.raises(RewardFunctionError) as info:
        _score([picky], pool=pool)
    assert info.value.what == "reward function uc_rewards.picky raised KeyError('answer')"
    assert "Traceback" in info.value.detail


def test_wrong_output_is_one_line_without_an_exception():
    def two(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError) as info:
        _score([two])
    assert info.value.exception is None
    assert info.value.what == "reward function 'two' returned 1 rewards for 2 completions; it must return exactly " \
                              "one reward (float or None) per completion"


def test_debug_switch_and_exception_text(monkeypatch):
    for value, on in (("1", True), ("yes", True), ("", False), ("0", False), ("false", False), ("No", False)):
        monkeypatch.setenv("REINFORGE_DEBUG", value)
        assert debug_enabled() is on, value
    monkeypatch.delenv("REINFORGE_DEBUG")
    assert not debug_enabled()
    assert describe_exception(ValueError("a\nb")) == "ValueError('a\\nb')"
    long = describe_exception(ValueError("x" * 500))
    assert len(long) == 200 + len("...)") and long.endswith("x...)")
    err = UserCodeError("dataset transform", "m.fn", ValueError("boom"))
    assert str(err) == err.what == "dataset transform m.fn raised ValueError('boom')" and err.detail is None


def test_transform_errors_are_one_line_with_the_row_and_its_columns(tmp_path, monkeypatch):
    from reinforge.config import DatasetConfig
    from reinforge.data.errors import DataError
    from reinforge.data.prepare import format_rows

    (tmp_path / "uc_tf.py").write_text(textwrap.dedent('''
        def t(cfg, dataset_idx=0):
            def fn(row):
                if row["n"] == 2:
                    return {"prompt": row["question"]}
                if row["n"] == 1:
                    raise ZeroDivisionError("no")
                return {"prompt": "p"}
            return fn
        '''))
    monkeypatch.chdir(tmp_path)
    ds = DatasetConfig(path="rows.jsonl", type="uc_tf.t")
    with pytest.raises(DataError) as err:
        format_rows(ds, "prompt", data=[{"n": 0}, {"n": 1}])
    assert str(err.value) == "rows.jsonl, row 1: dataset transform uc_tf.t raised ZeroDivisionError('no') (the row's columns: n)"
    assert 'raise ZeroDivisionError("no")' in err.value.detail
    with pytest.raises(DataError) as err:
        format_rows(ds, "prompt", data=[{"n": 2}])
    assert str(err.value) == ("rows.jsonl, row 0, field `question`: dataset transform uc_tf.t raised KeyError('question') "
                              "(the row's columns: n)")
