"""prepare_data: errors that name dataset/row/field/format with an example, counts, mixing, splits, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reinforge.config.loader import ConfigError, build_config
from reinforge.data.errors import DataError
from reinforge.data.prepare import prepare_data

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
U = {"role": "user", "content": "What is 2+2?"}


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(start, start + n)]


def write(path: Path, data: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    return str(path)


def cfg(tmp_path: Path, datasets: list[dict], **kw):
    base = {"base_model": "x", "rl": "dpo", "datasets": datasets, "dataset_prepared_path": str(tmp_path / "cache"),
            "sequence_len": 256}
    return build_config({**base, **kw})


# ---- errors --------------------------------------------------------------------------------------

def test_missing_field_names_dataset_row_field_format_and_example(tmp_path, tokenizer):
    data = rows(5)
    del data[3]["question"]
    p = write(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}]), tokenizer)
    msg = str(err.value)
    assert p in msg and "row 3" in msg and "field `question`" in msg and "missing" in msg
    assert "expected format `chatml.intel`" in msg and '"question": "What is 2+2?"' in msg
    assert (err.value.dataset, err.value.row, err.value.field) == (p, 3, "question")


def test_wrong_type_of_field(tmp_path, tokenizer):
    data = rows(3)
    data[1]["chosen"] = ["not", "text"]
    p = write(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}]), tokenizer)
    assert "row 1" in str(err.value) and "field `chosen`" in str(err.value) and "expected str, got list" in str(err.value)


def test_unknown_type_suggests_and_shows_example(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intell"}]), tokenizer)
    msg = str(err.value)
    assert p in msg and "field `type`" in msg and "Did you mean chatml.intel" in msg
    assert "expected format `chatml.intel`" in msg and '"question"' in msg


def test_format_of_another_method_is_named(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(DataError, match="is a format for DPO"):
        prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.icr"}], rl="kto", micro_batch_size=2), tokenizer)


def test_empty_split(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel", "split": "train[3:]"}]), tokenizer)
    assert p in str(err.value) and "empty" in str(err.value) and err.value.field == "split"
    assert "expected format `chatml.intel`" in str(err.value) and '"question"' in str(err.value)


def test_untyped_unknown_layout(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": p}]), tokenizer)
    assert "row 0" in str(err.value) and "match no known layout" in str(err.value)


def test_raise_strategy_names_the_source_row(tmp_path, tokenizer):
    data = rows(4)
    data[2]["chosen"] = "long " * 300
    p = write(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}], excess_length_strategy="raise"), tokenizer)
    assert "row 2" in str(err.value) and "sequence_len 256" in str(err.value)


# ---- counts, mixing, splits ------------------------------------------------------------------------

def test_counts_are_complete_and_reported_per_source(tmp_path, tokenizer):
    data = rows(6)
    data[4]["chosen"] = "long " * 300  # truncated (keep_end keeps the completion end)
    data[5]["question"] = "long " * 300  # prompt fills sequence_len with keep_start → dropped
    p = write(tmp_path / "d.jsonl", data)
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}], truncation_mode="keep_start"), tokenizer)
    s = d.stats
    assert (s.rows_in, s.records, s.rows_out, s.truncated, s.dropped_no_completion) == (6, 6, 5, 1, 1)
    assert s.rows_out == s.records - s.duplicates - s.dropped_too_long - s.dropped_no_completion
    assert len(d.train) == 5 and d.sources[0]["format"] == "chatml.intel" and d.sources[0]["rows_out"] == 5
    assert sorted(d.train_origin) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]


def test_mixing_shuffle_and_origins(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", rows(4))
    b = write(tmp_path / "b.jsonl", rows(4, start=10))
    d = prepare_data(cfg(tmp_path, [{"path": a, "type": "chatml.intel"}, {"path": b, "type": "chatml.intel"}]), tokenizer)
    assert len(d.train) == 8 and len(d.sources) == 2
    decoded = [tokenizer.decode(r["prompt_ids"]) for r in d.train]
    for text, (src, row) in zip(decoded, d.train_origin):
        assert f"q{row + 10 * src}<|im_end|>" in text
    assert d.train_origin != sorted(d.train_origin)  # shuffled
    d2 = prepare_data(cfg(tmp_path, [{"path": a, "type": "chatml.intel"}, {"path": b, "type": "chatml.intel"}],
                          shuffle_merged_datasets=False), tokenizer)
    assert d2.train_origin == sorted(d2.train_origin)


def test_val_set_size_and_test_datasets(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", rows(10))
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}], val_set_size=0.2), tokenizer)
    assert (len(d.train), len(d.eval)) == (8, 2)
    assert not set(d.train_origin) & set(d.eval_origin)
    t = write(tmp_path / "t.jsonl", rows(3, start=50))
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}],
                         test_datasets=[{"path": t, "type": "chatml.intel", "split": "test[:2]"}]), tokenizer)
    assert (len(d.train), len(d.eval)) == (10, 2)
    assert [s["role"] for s in d.sources] == ["train", "test"]


def test_exact_deduplication(tmp_path, tokenizer):
    data = rows(5) + rows(2)  # rows 5 and 6 repeat rows 0 and 1
    p = write(tmp_path / "d.jsonl", data)
    t = write(tmp_path / "t.jsonl", rows(1, start=4) + rows(1, start=90))  # the first repeats training row 4
    c = cfg(tmp_path, [{"path": p, "type": "chatml.intel"}], test_datasets=[{"path": t, "type": "chatml.intel"}],
            dataset_exact_deduplication=True)
    d = prepare_data(c, tokenizer)
    assert (len(d.train), len(d.eval), d.stats.duplicates) == (5, 1, 3)
    assert d.sources[0]["duplicates"] == 2 and d.sources[1]["duplicates"] == 1
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}]), tokenizer)
    assert len(d.train) == 7 and d.stats.duplicates == 0


def test_notes_are_counted(tmp_path, tokenizer):
    conv = [U, {"role": "assistant", "content": "4"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "x"}]
    p = write(tmp_path / "d.jsonl", [{"chosen": conv, "rejected": conv[:1] + [{"role": "assistant", "content": "5"}]}] * 2)
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.argilla_chat"}]), tokenizer)
    assert d.stats.notes == {f"{p}: turns after the first exchange ignored": 2}


def test_kto_demo_untyped_is_detected(tmp_path, tokenizer, caplog):
    caplog.set_level("INFO")
    c = cfg(tmp_path, [{"path": str(DATA / "kto_en_demo.json"), "split": "train[:40]"}], rl="kto", sequence_len=1024,
            micro_batch_size=2)
    d = prepare_data(c, tokenizer)
    assert d.sources[0]["format"] == "chat_template.default"
    assert "detected format `chat_template.default`" in caplog.text
    assert {type(r["label"]) for r in d.train} == {bool}
    assert d.stats.rows_in == 40 and d.stats.rows_out + d.stats.dropped == 40


def test_grpo_gsm8k_keeps_answer(tmp_path, tokenizer):
    c = cfg(tmp_path, [{"path": str(DATA / "gsm8k" / "train.jsonl"), "type": "reinforge_gsm8k.transform",
                        "split": "train[:16]"}], rl="grpo", trl={"reward_funcs": ["reinforge.rewards.math.accuracy"]},
            micro_batch_size=8)
    d = prepare_data(c, tokenizer)
    assert len(d.train) == 16 and set(d.train[0]) == {"prompt", "answer", "prompt_ids"}
    assert d.train[0]["answer"].rstrip().endswith("#### 72")


def test_per_dataset_chat_template(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", [{"messages": [U], "chosen": "4", "rejected": "5"}])
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "chat_template.default", "chat_template": "llama3"}]), tokenizer)
    assert tokenizer.decode(d.train[0]["prompt_ids"]).startswith("<|im_start|><|start_header_id|>user")
    with pytest.raises(ConfigError, match=r"`datasets\[0\].chat_template`: unknown chat_template 'nope'"):
        cfg(tmp_path, [{"path": p, "type": "chat_template.default", "chat_template": "nope"}])  # refused by the config


# ---- the cache ---------------------------------------------------------------------------------------

def test_cache_hit_and_invalidation(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", rows(6))
    c = cfg(tmp_path, [{"path": p, "type": "chatml.intel"}], val_set_size=2)
    first = prepare_data(c, tokenizer)
    assert not first.from_cache and Path(first.cache_path, "meta.json").is_file()
    second = prepare_data(c, tokenizer)
    assert second.from_cache and second.cache_path == first.cache_path
    assert (second.train, second.eval, second.train_origin) == (first.train, first.eval, first.train_origin)
    assert second.stats.to_dict() == first.stats.to_dict()
    # changed data, changed config, changed tokenizer (chat template) → prepared again
    write(tmp_path / "d.jsonl", rows(7))
    assert not prepare_data(c, tokenizer).from_cache
    assert not prepare_data(cfg(tmp_path, [{"path": p, "type": "chatml.intel"}], val_set_size=2, sequence_len=128),
                            tokenizer).from_cache
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ 'x' }}"
    assert not prepare_data(c, other).from_cache
    assert prepare_data(c, tokenizer).from_cache
    assert not prepare_data(c, tokenizer, rebuild=True).from_cache


def test_cache_covers_transform_source(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tf_cache_mod.py").write_text("def t(cfg, **kw):\n    return lambda ex: {'prompt': ex['q']}\n")
    p = write(tmp_path / "d.jsonl", [{"q": "a"}, {"q": "b"}])
    c = cfg(tmp_path, [{"path": p, "type": "tf_cache_mod.t"}], rl="grpo", trl={"reward_funcs": ["a.b"]}, micro_batch_size=8)
    assert not prepare_data(c, tokenizer).from_cache
    assert prepare_data(c, tokenizer).from_cache
    (tmp_path / "tf_cache_mod.py").write_text("def t(cfg, **kw):\n    return lambda ex: {'prompt': ex['q'] + '!'}\n")
    import sys

    sys.modules.pop("tf_cache_mod", None)
    d = prepare_data(c, tokenizer)
    assert not d.from_cache and d.train[0]["prompt"].endswith("!")


def test_corrupt_cache_entry_is_rebuilt(tmp_path, tokenizer):
    p = write(tmp_path / "d.jsonl", rows(3))
    c = cfg(tmp_path, [{"path": p, "type": "chatml.intel"}])
    first = prepare_data(c, tokenizer)
    Path(first.cache_path, "data.pkl").write_bytes(b"not a pickle")
    again = prepare_data(c, tokenizer)
    assert not again.from_cache and again.train == first.train


def test_unexpected_exception_in_a_format_still_names_the_row(tmp_path, tokenizer):
    # zephyr.nectar with a rank that cannot be compared (None vs int) fails inside sorted()
    good = {"prompt": "q", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 2}]}
    bad = {"prompt": "q", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": float("nan")}, "x"]}
    p = write(tmp_path / "d.jsonl", [good, good])
    p2 = tmp_path / "e.json"
    p2.write_text(json.dumps([good, bad]))
    d = prepare_data(cfg(tmp_path, [{"path": p, "type": "zephyr.nectar"}]), tokenizer)
    assert len(d.train) == 2
    with pytest.raises(DataError) as err:
        prepare_data(cfg(tmp_path, [{"path": str(p2), "type": "zephyr.nectar"}]), tokenizer)
    assert "row 1" in str(err.value) and "expected format `zephyr.nectar`" in str(err.value)


def test_cache_save_over_an_existing_entry(tmp_path):
    from reinforge.data import cache

    first = cache.save(tmp_path, "k", {"train": [1]}, {})
    again = cache.save(tmp_path, "k", {"train": [2]}, {})
    assert first == again and cache.load(tmp_path, "k")["train"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary directories left
