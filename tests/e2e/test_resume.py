"""A run that crashes and is resumed computes what the uninterrupted run computes (DPO and GRPO); non-finite steps.

The crash is simulated in-process by making the objective (DPO) or the rollout producer (GRPO) raise in the
middle of a later step, after a checkpoint was written; the resumed run (`resume_from_checkpoint=true`)
must log the same losses as an uninterrupted run with the same config, to 1e-5 in float32.
"""

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

import reinforge.training.offline as offline
import reinforge.rollout.producer as rollout_mod
from reinforge.cli import main

from conftest import DATA_DIR

DATASET = {"type": "chat_template.default", "field_messages": "conversations",
           "message_property_mappings": {"role": "from", "content": "value"},
           "roles": {"user": ["human"], "assistant": ["gpt"]}}


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def dpo_config(tmp_path, name, model_dir, **extra):
    rows = json.loads((DATA_DIR / "dpo_en_demo.json").read_text())[:6]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows))
    cfg = {"base_model": str(model_dir), "rl": "dpo", "rl_beta": 0.1, "datasets": [{**DATASET, "path": str(data)}],
           "sequence_len": 96, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 5,
           "learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 1, "output_dir": str(tmp_path / name),
           "use_tensorboard": False, "save_steps": 2, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path



def crash_dpo_in_step_5(tmp_path, model_dir, monkeypatch, **extra):
    """Run `dpo_config(tmp_path, "resumed", model_dir, **extra)` with an objective that raises Crash in the first
    micro-batch of step 5 (after step 4 was logged and checkpointed); returns the config's path."""
    build = offline.build_objective
    calls = {"n": 0}

    def crashing_objective(cfg):
        objective = build(cfg)

        def call(policy, ref, batch):
            calls["n"] += 1
            if calls["n"] == 9:  # 2 micro-batches per step
                raise Crash("simulated crash")
            return objective(policy, ref, batch)

        call.needs_reference = objective.needs_reference
        call.state_dict, call.load_state_dict = objective.state_dict, objective.load_state_dict  # checkpointed state
        call.token_stats = objective.token_stats  # the policy forward's statistics (entropy, logits/*)
        return call

    monkeypatch.setattr(offline, "build_objective", crashing_objective)
    cfg = dpo_config(tmp_path, "resumed", model_dir, **extra)
    with pytest.raises(Crash):
        main(["train", str(cfg)])
    monkeypatch.setattr(offline, "build_objective", build)
    return cfg

def assert_same_curves(a, b, keys):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in keys:
            if key in ma or key in mb:
                assert abs(ma[key] - mb[key]) < 1e-5, (key, ma, mb)


def assert_same_weights(dir_a, dir_b, file="model.safetensors"):
    a, b = load_file(dir_a / file), load_file(dir_b / file)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


class Crash(RuntimeError):
    pass


def test_dpo_crash_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch, capsys):
    # 6 pairs, 2 per micro-batch, 2 micro-batches per step: an epoch is 1.5 steps, so 5 steps cross epochs mid-step
    assert main(["train", str(dpo_config(tmp_path, "full", tiny_model_dir))]) == 0
    full = metrics(tmp_path / "full")

    cfg = crash_dpo_in_step_5(tmp_path, tiny_model_dir, monkeypatch)
    out = tmp_path / "resumed"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]

    assert main(["train", str(cfg), "resume_from_checkpoint=true"]) == 0
    resumed = metrics(out)
    assert_same_curves(full, resumed, ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "learning_rate", "epoch"))
    assert_same_weights(tmp_path / "full", out)
    info = [json.loads(l) for l in (out / "run_info.jsonl").read_text().splitlines()]
    assert [i["event"] for i in info] == ["start", "resume"] and info[1]["step"] == 4
    assert "torch" in info[0]["versions"] and (out / "reinforge_config.yaml").exists()

    # an explicit path resumes from an earlier checkpoint; the later metrics lines are replaced, not duplicated
    assert main(["train", str(cfg), f"resume_from_checkpoint={out / 'checkpoint-2'}"]) == 0
    assert_same_curves(full, metrics(out), ("loss", "grad_norm"))


REWARDS = '''
def even_tokens(prompts, completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
'''


def grpo_config(tmp_path, name, model_dir, **extra):
    (tmp_path / "resume_rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"Say something about topic {i}."}]} for i in range(6)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trl = {"num_generations": 4, "max_completion_length": 6, "top_k": 20, "reward_funcs": ["resume_rewards.even_tokens"],
           "num_iterations": 2, "beta": 0.04}
    cfg = {"base_model": str(model_dir), "rl": "grpo", "datasets": [{"path": str(tmp_path / "prompts.jsonl")}],
           "trl": trl, "micro_batch_size": 4, "max_steps": 6, "learning_rate": 5e-3, "lr_scheduler": "cosine",
           "output_dir": str(tmp_path / name), "use_tensorboard": False, "seed": 3, "save_steps": 3, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grpo_crash_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # one prompt (4 completions) per rollout, each rollout optimised twice (steps 1-2, 3-4, 5-6): checkpoint-3
    # falls in the middle of the second rollout (saved with the checkpoint and reused on resume), and the third
    # rollout is generated again from its seed
    assert main(["train", str(grpo_config(tmp_path, "full", tiny_model_dir))]) == 0
    full = metrics(tmp_path / "full")

    make = rollout_mod.RolloutProducer.produce
    calls = {"n": 0}

    def crashing_make(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # generating the third rollout, at step 5
            raise Crash("simulated crash")
        return make(self, *args, **kwargs)

    monkeypatch.setattr(rollout_mod.RolloutProducer, "produce", crashing_make)
    cfg = grpo_config(tmp_path, "resumed", tiny_model_dir)
    with pytest.raises(Crash):
        main(["train", str(cfg)])
    monkeypatch.setattr(rollout_mod.RolloutProducer, "produce", make)
    out = tmp_path / "resumed"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert torch.load(out / "checkpoint-3" / "rank_0.pt", weights_only=False)["rollout"] is not None
    assert main(["train", str(cfg), "resume_from_checkpoint=true"]) == 0
    assert_same_curves(full, metrics(out), ("loss", "reward", "kl", "grad_norm", "learning_rate",
                                            "completions/mean_length", "clip_ratio/region_mean"))
    assert "reward" in full[4] and "reward" not in full[3]  # a new rollout at step 5, the second pass at step 4
    assert_same_weights(tmp_path / "full", out)


def test_nonfinite_step_is_skipped_then_persistent_ones_stop_the_run(tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                                    caplog):
    build = offline.build_objective
    bad_calls: set[int] = set()
    calls = {"n": 0}

    def nan_objective(cfg):
        objective = build(cfg)

        def call(policy, ref, batch):
            loss, metrics = objective(policy, ref, batch)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] in bad_calls else loss), metrics

        call.needs_reference = objective.needs_reference
        call.state_dict, call.load_state_dict = objective.state_dict, objective.load_state_dict  # checkpointed state
        return call

    monkeypatch.setattr(offline, "build_objective", nan_objective)
    bad_calls.update({3})  # one micro-batch of step 2
    assert main(["train", str(dpo_config(tmp_path, "once", tiny_model_dir, max_steps=3, save_steps=None))]) == 0
    m = metrics(tmp_path / "once")
    assert [x["skipped_nonfinite_steps"] for x in m] == [0, 1, 1]
    assert "loss" not in m[1] and all(x == x for x in (m[0]["loss"], m[2]["loss"]))  # step 2 left out, no NaN logged
    assert "step 2: non-finite loss or gradient" in caplog.text and "step skipped (1 in a row, 1 in total" in caplog.text

    calls["n"] = 0
    bad_calls.clear()
    bad_calls.update(range(5, 100))  # from step 3 on
    cfg = dpo_config(tmp_path, "diverged", tiny_model_dir, max_steps=8, save_steps=None,
                     max_consecutive_nonfinite_steps=2)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    from reinforge.training.distributed import BatchPlan

    plan = BatchPlan(6, 2, seed=42)
    rows = sorted(set(plan.global_rows(6) + plan.global_rows(7)))  # step 4 = micro-batches 6 and 7
    assert "error: step 4: non-finite loss or gradient" in err and "2 non-finite steps in a row" in err
    assert "max_consecutive_nonfinite_steps: 2" in err
    named = err.split("rows of this step: ")[1].split(". 2 non-finite")[0]
    assert sorted(int(x) for x in re.findall(r"pairs\.json row (\d+)", named)) == rows


def test_metrics_reach_every_tracker_offline(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """metrics.jsonl always; TensorBoard, W&B (offline) and MLflow (file store) through accelerate's trackers."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    uri = (tmp_path / "mlruns").as_uri()
    # MLflow 3 refuses its file store unless allowed; the error a user then sees names the tracker:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    refused = dpo_config(tmp_path, "refused", tiny_model_dir, max_steps=1, save_steps=None, use_mlflow=True,
                         mlflow_tracking_uri=uri)
    assert main(["train", str(refused)]) == 1
    assert "starting the experiment trackers (MLflowTracker) failed: MlflowException" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = dpo_config(tmp_path, "tracked", tiny_model_dir, max_steps=2, save_steps=None, use_tensorboard=True,
                     use_wandb=True, wandb_project="reinforge-test", wandb_name="tiny", wandb_mode="offline",
                     mlflow_tracking_uri=uri, mlflow_experiment_name="reinforge-test", mlflow_run_name="tiny")
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "tracked"
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["reinforge-test"], output_format="list")
    assert len(found) == 1 and found[0].info.run_name == "tiny"
    history = mlflow.MlflowClient(uri).get_metric_history(found[0].info.run_id, "loss")
    assert [h.step for h in history] == [1, 2] and abs(history[0].value - metrics(out)[0]["loss"]) < 1e-6
    assert found[0].data.params["rl"] == "dpo" and "versions.torch" in found[0].data.params
