"""`reinforge train` end to end on a tiny random model: loss goes down, output reloads, errors are clear."""

import json

import pytest
import torch
import yaml

from reinforge.cli import main

from conftest import DATA_DIR

DATASET = {
    "path": None,
    "type": "chat_template.default",
    "field_messages": "conversations",
    "message_property_mappings": {"role": "from", "content": "value"},
    "roles": {"user": ["human"], "assistant": ["gpt"]},
}


def write_config(tmp_path, model_dir, rows, **extra):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows))
    cfg = {
        "base_model": str(model_dir), "rl": "dpo", "rl_beta": 0.1,
        "datasets": [{**DATASET, "path": str(data)}],
        "sequence_len": 128, "micro_batch_size": 4, "max_steps": 12, "learning_rate": 3e-3,
        "lr_scheduler": "constant", "output_dir": str(tmp_path / "out"), "logging_steps": 1,
        "use_tensorboard": False, **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_rows():
    return json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:4]


def test_full_finetune_loss_falls_and_reloads(tmp_path, tiny_model_dir, demo_rows):
    cfg = write_config(tmp_path, tiny_model_dir, demo_rows)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    train = [m for m in read_metrics(out) if "loss" in m]
    assert len(train) == 12
    assert abs(train[0]["loss"] - 0.6931) < 1e-3  # policy == reference at step 1
    # overfitting 4 pairs: the last losses are well below ln 2 and the first
    assert sum(m["loss"] for m in train[-3:]) / 3 < 0.5
    assert train[-1]["rewards/accuracies"] == 1.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "grad_norm", "learning_rate", "tokens_per_second", "logits/chosen", "logits/rejected",
                "mean_token_accuracy", "entropy"):
        assert key in train[-1]
    # trained to prefer the chosen completions, the policy predicts their tokens better than at the start
    assert train[-1]["mean_token_accuracy"] > train[0]["mean_token_accuracy"], [m["mean_token_accuracy"] for m in train]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    assert changed
    assert (out / "reinforge_config.yaml").exists()


def test_lora_adapter_saved_and_loads_with_peft(tmp_path, tiny_model_dir, demo_rows):
    cfg = write_config(tmp_path, tiny_model_dir, demo_rows, adapter="lora", lora_r=4, lora_alpha=8,
                       lora_target_linear=True, max_steps=6, val_set_size=1)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists()
    metrics = read_metrics(out)
    assert "eval_rewards/accuracies" in metrics[0] and metrics[0]["step"] == 0
    assert "eval_rewards/margins" in metrics[-1]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hello", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3


def test_missing_chosen_names_file_row_field(tmp_path, tiny_model_dir, demo_rows, capsys):
    rows = [dict(r) for r in demo_rows]
    del rows[2]["chosen"]
    cfg = write_config(tmp_path, tiny_model_dir, rows)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "pairs.json, row 2, field `chosen`: missing" in err
    assert "chat_template.default" in err


def test_validate_names_misspelled_key(tmp_path, tiny_model_dir, demo_rows, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, demo_rows)
    cfg.write_text(cfg.read_text().replace("learning_rate", "learnig_rate"))
    assert main(["validate", str(cfg)]) == 2
    assert "did you mean `learning_rate`" in capsys.readouterr().err


def test_non_empty_output_dir_is_refused(tmp_path, tiny_model_dir, demo_rows, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, demo_rows)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["train", str(cfg)]) == 1
    assert "overwrite_output_dir" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").exists()


def test_precomputed_reference_matches_and_is_cached(tmp_path, tiny_model_dir, demo_rows, monkeypatch):
    import reinforge.training.reference_cache as rc

    monkeypatch.setattr(rc, "CACHE_DIR", tmp_path / "cache")
    base = dict(max_steps=4, val_set_size=1)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    live = write_config(tmp_path / "a", tiny_model_dir, demo_rows, **base)
    assert main(["train", str(live)]) == 0
    pre = write_config(tmp_path / "b", tiny_model_dir, demo_rows, precompute_ref_log_probs=True, **base)
    assert main(["train", str(pre)]) == 0
    files = sorted((tmp_path / "cache" / "ref_logps").iterdir())
    assert len(files) == 2  # train rows and eval rows
    a, b = read_metrics(tmp_path / "a" / "out"), read_metrics(tmp_path / "b" / "out")
    for ma, mb in zip(a, b):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins"):
            if key in ma:
                assert abs(ma[key] - mb[key]) < 1e-5, (key, ma, mb)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = write_config(tmp_path / "c", tiny_model_dir, demo_rows, precompute_ref_log_probs=True, **base)
    assert main(["train", str(again)]) == 0
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache" / "ref_logps").iterdir())] == mtimes
    c = read_metrics(tmp_path / "c" / "out")
    assert abs(c[-1]["eval_loss"] - b[-1]["eval_loss"]) < 1e-6
