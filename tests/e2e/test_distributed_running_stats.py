"""Statistics that span the whole batch are the same on two processes as on one: KTO's KL reference point z₀
and bco_pair's running reward mean δ.

KTO estimates z₀ from mismatched (prompt, completion) pairs; reinforge rotates the completions over the global
micro-batch (each process reads its slice) and averages z₀ across processes before the clamp, so two processes
with 2 rows each compute the z₀ of one process with 4 rows. bco_pair's δ is the mean of every implicit reward
seen in training so far, summed across processes. The single-process run takes micro_batch_size 4, the
two-process run 2 per process (`reinforge train --num-processes 2`); the per-step losses, `kl` /
`bco_running_mean` and the weights after the updates must agree to 1e-5 (SGD, see test_distributed.py).
The reference is a different tiny model, so that z₀ and δ are away from 0 from the first step.
"""

import json

import pytest
import yaml

from reinforge.cli import main

from conftest import DATA_DIR, build_tiny_model
from test_distributed import BIN, assert_same, run_two


@pytest.fixture(scope="module")
def other_ref_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("ref-llama"), seed=2)


def _run_both(tmp_path, cfg, keys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), f"output_dir={tmp_path / 'one'}"]) == 0
    run_two([str(BIN / "reinforge"), "train", str(path), f"output_dir={tmp_path / 'two'}", "micro_batch_size=2",
             "--num-processes", "2"], tmp_path)
    return assert_same(tmp_path / "one", tmp_path / "two", keys)


def test_kto_kl_reference_point_two_processes_equal_one(tmp_path, tiny_model_dir, other_ref_dir):
    # short conversational rows (prompts of 40-59 tokens, completions of 34-47): every mismatched pair puts a
    # whole completion after another prompt, so which completion goes with which prompt changes z₀
    src = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:8]
    rows = [{"prompt": [{"role": "user", "content": r["conversations"][0]["value"][:120]}],
             "completion": [{"role": "assistant", "content": (r["chosen"] if i % 3 else r["rejected"])["value"][:160]}],
             "label": bool(i % 3)} for i, r in enumerate(src)]
    (tmp_path / "kto.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {"base_model": str(tiny_model_dir), "ref_model": str(other_ref_dir), "rl": "kto", "rl_beta": 0.1,
           "datasets": [{"path": str(tmp_path / "kto.jsonl")}], "sequence_len": 96, "micro_batch_size": 4,
           "max_steps": 3, "learning_rate": 0.005, "lr_scheduler": "constant", "optimizer": "sgd",
           "use_tensorboard": False, "kto_undesirable_weight": 1.5}
    m = _run_both(tmp_path, cfg, ("loss", "kl", "grad_norm"))
    assert [x["step"] for x in m] == [1, 2, 3]
    # z₀ is not clamped to 0 in steps 1 and 2 (step 3's batch has a negative mean log-ratio), so the losses carry
    # it: rotating within each process's 2 rows instead gives another z₀ and losses off by ~1e-3
    assert m[0]["kl"] > 0.05 and m[1]["kl"] > 0.05, [x["kl"] for x in m]


def test_bco_pair_running_mean_two_processes_equal_one(tmp_path, tiny_model_dir, other_ref_dir):
    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:8]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    ds = {"path": str(tmp_path / "pairs.json"), "type": "chat_template.default", "field_messages": "conversations",
          "message_property_mappings": {"role": "from", "content": "value"}, "roles": {"user": ["human"], "assistant": ["gpt"]}}
    cfg = {"base_model": str(tiny_model_dir), "ref_model": str(other_ref_dir), "rl": "dpo", "rl_beta": 0.1,
           "dpo_loss_type": ["bco_pair"], "datasets": [ds], "sequence_len": 48, "micro_batch_size": 4, "max_steps": 3,
           "learning_rate": 0.05, "lr_scheduler": "constant", "optimizer": "sgd", "use_tensorboard": False}
    m = _run_both(tmp_path, cfg, ("loss", "bco_running_mean", "rewards/margins", "rewards/chosen", "grad_norm"))
    assert [x["step"] for x in m] == [1, 2, 3]
    # δ after step k is the mean of the rewards of every pair of steps 1..k (one micro-batch per step, all
    # processes): the mean over the steps of (rewards/chosen + rewards/rejected) / 2
    pair_means = [(x["rewards/chosen"] + x["rewards/rejected"]) / 2 for x in m]
    for k, x in enumerate(m):
        assert abs(x["bco_running_mean"] - sum(pair_means[:k + 1]) / (k + 1)) < 1e-5, (k, x)
    deltas = [x["bco_running_mean"] for x in m]
    assert abs(deltas[0]) > 5e-3 and abs(deltas[2] - deltas[0]) > 1e-4, deltas  # away from 0, and it moves
