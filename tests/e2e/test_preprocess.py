"""`reinforge preprocess` end to end: counts, token-length percentiles, rendered examples, the cache on a second run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from reinforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "assets" / "smollm2-tokenizer"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


DEMO_VAL = int(yaml.safe_load((ROOT / "examples" / "dpo-smollm2.yaml").read_text())["val_set_size"])


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["preprocess", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dpo_demo_twice_second_from_cache(in_repo, tmp_path, capsys):
    args = ["examples/dpo-smollm2.yaml", f"tokenizer_config={TOKENIZER}", f"dataset_prepared_path={tmp_path}",
            "--examples", "2"]
    code, first, _ = run(capsys, *args)
    assert code == 0
    assert "prepared in" in first and "format chat_template.default" in first
    assert "300 rows → 300 records" in first
    m = re.search(r"total: 300 rows in, (\d+) kept \((\d+) truncated, (\d+) dropped\) → (\d+) train, (\d+) eval", first)
    kept, truncated, dropped, n_train, n_eval = map(int, m.groups())
    assert kept + dropped == 300 and n_train + n_eval == kept and n_eval == DEMO_VAL
    assert re.search(r"^\s+prompt\s+\d+\s+\d+", first, re.M) and "p95" in first
    assert first.count("── example") == 2 and "⟦" in first and "⟧" in first
    # the prompt ends with the generation prompt; each response is trained from its first token
    assert "<|im_start|>assistant\n\n[chosen]\n⟦" in first and "[rejected]\n⟦" in first
    assert "hint: 102 of 300 rows (34%) were dropped" in first  # the demo's keep_start at 512 drops long prompts
    code, second, _ = run(capsys, *args)
    assert code == 0 and "served from the cache" in second
    strip = lambda s: re.sub(r"\d+\.\d+s", "", s.split("\n", 1)[1])  # noqa: E731  (timings differ)
    assert strip(second).split("done in")[0] == strip(first).split("done in")[0]
    code, third, _ = run(capsys, *args, "--rebuild", "--tokens")
    assert code == 0 and "prepared in" in third and "│" in third


def test_kto_and_grpo_preview(in_repo, tmp_path, capsys):
    code, out, _ = run(capsys, "examples/dpo-smollm2.yaml", "rl=kto", "micro_batch_size=2", "val_set_size=0",
                       "datasets=[{path: examples/data/kto_en_demo.json, split: 'train[:20]'}]",
                       f"tokenizer_config={TOKENIZER}", f"dataset_prepared_path={tmp_path}", "--examples", "1")
    assert code == 0 and ("label desirable" in out or "label undesirable" in out)
    assert "format chat_template.default" in out
    code, out, _ = run(capsys, "examples/dpo-smollm2.yaml", "rl=grpo", "micro_batch_size=8", "val_set_size=0",
                       "trl.reward_funcs=[reinforge.rewards.math.accuracy]",
                       "datasets=[{path: examples/data/gsm8k/train.jsonl, type: reinforge_gsm8k.transform, split: 'train[:8]'}]",
                       f"tokenizer_config={TOKENIZER}", f"dataset_prepared_path={tmp_path}", "--examples", "1")
    assert code == 0 and "[prompt as the model sees it before generating]" in out and "[column answer]" in out
    assert "#### <number>" in out


def test_bad_type_exits_2_with_a_clear_message(in_repo, tmp_path, capsys):
    code, _, err = run(capsys, "examples/dpo-smollm2.yaml", "datasets=[{path: examples/data/dpo_en_demo.json, type: chatml.intell}]",
                       f"tokenizer_config={TOKENIZER}", f"dataset_prepared_path={tmp_path}")
    assert code == 2
    assert "examples/data/dpo_en_demo.json, field `type`: unknown dataset type `chatml.intell`" in err
    assert "Did you mean chatml.intel" in err and "a record like" in err
    code, _, err = run(capsys, "examples/dpo-smollm2.yaml", "datasets=[{path: examples/data/dpo_en_demo.json, type: chatml.intel}]",
                       f"tokenizer_config={TOKENIZER}", f"dataset_prepared_path={tmp_path}")
    assert code == 2 and "row 0, field `question`: missing" in err and "expected format `chatml.intel`" in err


def test_mark_and_render_example(tokenizer):
    from reinforge.data.preview import mark, render_example

    ids = tokenizer("a b c d", add_special_tokens=False)["input_ids"]
    assert mark(tokenizer, ids, [False, False, True, True]) == "a b⟦ c d⟧"
    assert mark(tokenizer, ids, [False, True, False, True], tokens=True) == "a│⟦ b⟧│ c│⟦ d⟧"
    row = {"prompt_ids": ids[:2], "completion_ids": ids[2:], "label": False}
    text = render_example(tokenizer, row, "unpaired", "t")
    assert text.splitlines()[1:] == ["   prompt 2 tokens (not trained) · completion 2 trained of 2 · label undesirable",
                                     "[prompt]", "a b", "[completion]", "⟦ c d⟧"]
