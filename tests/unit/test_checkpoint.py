"""Checkpoints (atomic writes, rotation, loading back), batch plans, signals, non-finite steps, run config keys."""

import json
import os
import random
import signal
import types

import pytest
import torch

from reinforge.config.loader import ConfigError, build_config
from reinforge.training import checkpoint as ckpt
from reinforge.training.distributed import BatchPlan, BatchStream
from reinforge.training.metrics import MetricsAccumulator, MetricsWriter
from reinforge.training.resume import RunControl, config_differences, resume_command
from reinforge.training.setup import RunError, prepare_output_dir, resolve_resume
from reinforge.training.signals import StopNow, StopSignal

BASE = {"base_model": "m", "rl": "dpo", "datasets": [{"path": "d.json"}]}


def cfg_of(**kw):
    return build_config({**BASE, **kw})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _parts(model, lr=0.1):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def _train_one(model, opt, sched):
    loss = sum(p.float().pow(2).mean() for p in model.parameters())
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _save(tmp_path, model, tok, opt, sched, step, **kw):
    cfg = cfg_of(output_dir=str(tmp_path))
    return ckpt.save_checkpoint(tmp_path, step, model=model, tokenizer=tok, cfg=cfg, optimizer=opt, scheduler=sched,
                                state={"position": step * 2, "data": {"rows": 8}}, rank_state={"note": step}, **kw)


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path, tiny_model_dir, tiny):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt, sched = _parts(model)
    _train_one(model, opt, sched)
    random.seed(3)
    torch.manual_seed(3)
    path = _save(tmp_path, model, tok, opt, sched, 1)
    expected_draws = (random.random(), torch.rand(3))
    assert path == tmp_path / "checkpoint-1" and ckpt.is_complete(path)
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists() and (path / "reinforge_config.yaml").exists()
    assert json.loads((path / "trainer_state.json").read_text())["position"] == 2

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the untrained weights
    opt2, sched2 = _parts(fresh)
    state, rank_state = ckpt.load_checkpoint(path, model=fresh, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 1 and state["world_size"] == 1 and rank_state == {"note": 1}
    draws = (random.random(), torch.rand(3))  # RNG states restored to the save point
    assert draws[0] == expected_draws[0] and torch.equal(draws[1], expected_draws[1])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.state_dict()["last_epoch"] == 1 and sched2.get_last_lr() == sched.get_last_lr()
    for sa, sb in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    # continuing both gives the same weights
    _train_one(model, opt, sched)
    _train_one(fresh, opt2, sched2)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.allclose(a, b, atol=0, rtol=0)


def test_crash_while_writing_leaves_no_checkpoint_that_resume_would_use(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    opt, sched = _parts(model)
    _save(tmp_path, model, tok, opt, sched, 2)
    real_save = torch.save

    def crash_on_optimizer(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            with open(f, "wb") as fh:  # half a file, then the process "dies"
                fh.write(b"partial")
            raise OSError("simulated crash: disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_optimizer)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, model, tok, opt, sched, 4)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / "checkpoint-4.tmp" / "optimizer.pt").read_bytes() == b"partial"
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    cfg = cfg_of(output_dir=str(tmp_path), resume_from_checkpoint=True)
    assert resolve_resume(cfg) == tmp_path / "checkpoint-2"
    with pytest.raises(RunError, match="not a complete checkpoint"):
        resolve_resume(cfg_of(output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / "checkpoint-4.tmp")))
    # a directory named like a checkpoint but without trainer_state.json (e.g. copied by hand) is not complete
    (tmp_path / "checkpoint-9").mkdir()
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    # the next save removes the stale temporary directory
    _save(tmp_path, model, tok, opt, sched, 6)
    assert not (tmp_path / "checkpoint-4.tmp").exists()
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"


def test_total_limit_keeps_the_newest(tmp_path, tiny):
    model, tok = tiny
    opt, sched = _parts(model)
    for step in (1, 2, 3, 4):
        _save(tmp_path, model, tok, opt, sched, step, total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_resume_true_without_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint-3.tmp").mkdir()
    with pytest.raises(RunError, match=r"no complete checkpoint \(found only incomplete: checkpoint-3.tmp\)"):
        resolve_resume(cfg_of(output_dir=str(tmp_path), resume_from_checkpoint=True))
    with pytest.raises(RunError, match="does not exist"):
        resolve_resume(cfg_of(output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / "nope")))


def test_output_dir_kept_when_resuming_refused_otherwise(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="overwrite_output_dir"):
        prepare_output_dir(cfg_of(output_dir=str(tmp_path)))
    prepare_output_dir(cfg_of(output_dir=str(tmp_path), resume_from_checkpoint=True), resuming=True)
    assert (tmp_path / "metrics.jsonl").exists()
    prepare_output_dir(cfg_of(output_dir=str(tmp_path), overwrite_output_dir=True))
    assert list(tmp_path.iterdir()) == []


def test_full_model_mismatch_is_an_error(tmp_path, tiny):
    model, tok = tiny
    opt, sched = _parts(model)
    path = _save(tmp_path, model, tok, opt, sched, 1)
    small = torch.nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="do not match"):
        ckpt.load_model_weights(small, path)
    fake = types.SimpleNamespace(num_processes=2, process_index=0, distributed_type="MULTI_CPU")
    with pytest.raises(RuntimeError, match=r"written by 1 process\(es\); resume it with one process \(without --num-processes\), not 2"):
        ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, accelerator=fake)


# ------------------------------------------------------------------------------------------ batch plans
def test_plan_epoch_orders_are_seeded_permutations():
    plan = BatchPlan(10, 4, seed=7)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    assert [plan.rows(k) for k in range(3)] == [order[0:4], order[4:8], order[8:10]]
    assert plan.order(1) == torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert plan.per_epoch == 3 and len(plan.rows(2)) == 2  # a short last batch with one process
    assert sorted(sum((plan.rows(k) for k in range(3, 6)), [])) == list(range(10))
    assert plan.order(0) != plan.order(1)


def test_plan_two_processes_read_the_single_process_rows():
    one = BatchPlan(10, 4, seed=1)
    two = [BatchPlan(10, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for k in range(2):
        assert two[0].rows(k) + two[1].rows(k) == one.rows(k)
    # the last global batch (2 rows) is filled up from the epoch's start so both processes get 2 rows
    last = two[0].rows(2) + two[1].rows(2)
    assert last == one.rows(2) + one.order(0)[:2]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        BatchPlan(3, 2, world_size=2, drop_last=True)
    assert BatchPlan(9, 2, world_size=2, drop_last=True).per_epoch == 2


def test_stream_resumes_at_its_position():
    plan = BatchPlan(7, 2, seed=0)
    data = [{"i": i} for i in range(7)]
    full = BatchStream(plan, data, lambda rows: [r["i"] for r in rows])
    seq = [next(full) for _ in range(9)]
    later = BatchStream(plan, data, lambda rows: [r["i"] for r in rows], start=5)
    assert [next(later) for _ in range(4)] == seq[5:]
    assert full.position == 9


# ------------------------------------------------------------------------------------------- metrics
def test_accumulator_state_and_nan_names():
    acc = MetricsAccumulator()
    acc.add({"a": 1.0, "b": float("nan")})
    acc.add({"a": 3.0, "b": 2.0}, weight=3)
    assert acc.means() == {"a": 2.5, "b": 2.0}
    only_nan = MetricsAccumulator()
    only_nan.add({"b": float("nan")})
    assert "b" in only_nan.sums and only_nan.means() == {}  # name known (for cross-process reduction), no value
    again = MetricsAccumulator.from_state(json.loads(json.dumps(acc.state_dict())))
    again.merge(only_nan)
    assert again.means() == acc.means()


def test_writer_on_resume_drops_later_records(tmp_path):
    acc = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, log=lambda *a, **k: None)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)))
    w = MetricsWriter(tmp_path, acc, resume_step=3)
    assert [r["step"] for r in w.history] == [1, 2, 3]
    w.log({"loss": 0.4}, 4)
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------- signals, non-finite
def test_first_signal_is_recorded_second_raises():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when run as a background job
    with StopSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(StopNow) as info:
            os.kill(os.getpid(), signal.SIGINT)
        assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def _control(tmp_path, **kw):
    cfg = cfg_of(output_dir=str(tmp_path), **kw)
    acc = types.SimpleNamespace(device="cpu", is_main_process=True, process_index=0, num_processes=1)
    return RunControl(cfg, acc, tmp_path, module=None, tokenizer=None, optimizer=None, scheduler=None,
                      data_layout={}, describe=lambda rows: "pairs.json rows " + ", ".join(map(str, rows)))


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    run = _control(tmp_path, max_consecutive_nonfinite_steps=2)
    one = torch.tensor(1.0)
    assert run.step_ok(1, [one], one, [0, 1])
    assert not run.step_ok(2, [torch.tensor(float("nan"))], one, [2, 3])
    assert run.step_ok(3, [one], torch.tensor(0.5), [4, 5])  # a finite step resets the run of bad ones
    assert not run.step_ok(4, [one], torch.tensor(float("inf")), [6, 7])
    with pytest.raises(RunError) as info:
        run.step_ok(5, [one, torch.tensor(float("-inf"))], one, [8, 9])
    msg = str(info.value)
    assert "step 5" in msg and "pairs.json rows 8, 9" in msg and "2 non-finite steps in a row" in msg
    assert "max_consecutive_nonfinite_steps: 2" in msg
    assert run.skipped_nonfinite_steps == 3


def test_optimizer_step_takes_or_skips_and_always_zeroes_gradients(tmp_path):
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    cfg = cfg_of(output_dir=str(tmp_path), max_grad_norm=1.0)
    acc = types.SimpleNamespace(device="cpu", is_main_process=True, process_index=0, num_processes=1,
                                clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    run = RunControl(cfg, acc, tmp_path, module=None, tokenizer=None, optimizer=opt, scheduler=sched, data_layout={},
                     describe=str)
    w.grad = torch.tensor([3.0, 4.0])  # norm 5 → clipped to (0.6, 0.8); SGD at lr 0.5
    norm = run.optimizer_step(1, [torch.tensor(0.7)], [w], [0])
    assert float(norm) == pytest.approx(5.0) and w.grad is None
    assert w.detach().tolist() == pytest.approx([1.0 - 0.3, 2.0 - 0.4])
    assert sched.get_last_lr() == [0.25]  # the scheduler stepped once
    w.grad = torch.tensor([1.0, 1.0])
    assert run.optimizer_step(2, [torch.tensor(float("nan"))], [w], [1]) is None  # skipped: no update, no lr step
    assert w.detach().tolist() == pytest.approx([0.7, 1.6]) and w.grad is None and sched.get_last_lr() == [0.25]
    assert run.skipped_nonfinite_steps == 1


def test_resume_command_and_config_differences(monkeypatch):
    monkeypatch.setattr("sys.argv", ["reinforge", "train", "c.yaml", "lr=1", "resume_from_checkpoint=x"])
    assert resume_command(1) == "reinforge train c.yaml lr=1 resume_from_checkpoint=true"
    assert resume_command(2) == "reinforge train --num-processes=2 c.yaml lr=1 resume_from_checkpoint=true"
    old, new = {"a": 1, "trl": {"beta": 0.1}, "save_steps": 2}, {"a": 1, "trl": {"beta": 0.2}, "save_steps": 5}
    assert config_differences(old, new) == ["trl.beta (0.1 → 0.2)"]


# ------------------------------------------------------------------------------------------ config keys
def test_run_keys_validation(tmp_path):
    assert cfg_of(save_steps=5).save_strategy_value == "steps"
    assert cfg_of().save_strategy_value == "no"
    for bad, match in [({"save_strategy": "steps"}, "needs save_steps"),
                       ({"save_strategy": "epoch", "save_steps": 3}, "save_steps is used only with"),
                       ({"resume_from_checkpoint": True, "overwrite_output_dir": True}, "would delete it"),
                       ({"fsdp": ["full_shard", "autowrap"]}, "unknown fsdp option 'autowrap'"),
                       ({"fsdp_config": {"fsdp_offload": True}}, "unknown fsdp_config key"),
                       ({"deepspeed": str(tmp_path / "none.json")}, "does not exist"),
                       ({"deepspeed": {"zero_optimization": {"stage": 4}}}, "stage must be 0, 1, 2 or 3"),
                       ({"deepspeed": {}, "fsdp": True}, "either deepspeed or fsdp"),
                       ({"save_total_limit": 0}, "greater than or equal to 1")]:
        with pytest.raises(ConfigError, match=match):
            cfg_of(**bad)
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    assert cfg_of(deepspeed=str(ds)).deepspeed_dict["zero_optimization"]["stage"] == 3
    from reinforge.config.run import fsdp_plugin_kwargs

    assert fsdp_plugin_kwargs(["full_shard", "auto_wrap"], {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                                            "fsdp_version": 2}) == {
        "reshard_after_forward": True, "auto_wrap_policy": "transformer_based_wrap",
        "transformer_cls_names_to_wrap": ["LlamaDecoderLayer"], "fsdp_version": 2}
    assert fsdp_plugin_kwargs("shard_grad_op offload", None) == {"reshard_after_forward": "SHARD_GRAD_OP",
                                                                 "cpu_offload": True}
    c = cfg_of(wandb_project="p")
    assert c.use_wandb_value and not cfg_of(wandb_project="p", use_wandb=False).use_wandb_value


def test_deepspeed_auto_values_filled_and_missing_package_is_clear(tmp_path):
    from reinforge.training.distributed import deepspeed_config
    from reinforge.training.setup import make_accelerator

    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                              "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}))
    cfg = cfg_of(deepspeed=str(ds), micro_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True)
    assert deepspeed_config(cfg) == {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 3,
                                     "gradient_accumulation_steps": 2, "gradient_clipping": 0.5, "bf16": {"enabled": True}}
    pytest.importorskip("accelerate")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(RunError, match="deepspeed package is not installed"):
            make_accelerator(cfg)


class CountingObjective:
    """An objective with running state (like bco_pair's running mean)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def state_dict(self):
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state):
        self.total, self.count = state["total"], state["count"]


def test_objective_state_is_saved_and_restored(tmp_path, tiny):
    model, tok = tiny
    opt, sched = _parts(model)
    obj = CountingObjective()
    obj.total, obj.count = 4.5, 9
    path = _save(tmp_path, model, tok, opt, sched, 1, objective=obj)
    again = CountingObjective()
    ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, objective=again)
    assert (again.total, again.count) == (4.5, 9)
    path2 = _save(tmp_path, model, tok, opt, sched, 2)  # written without the objective's state
    with pytest.raises(RuntimeError, match="no objective_state.pt"):
        ckpt.load_checkpoint(path2, model=model, optimizer=opt, scheduler=sched, objective=again)


def test_end_step_saves_on_schedule_and_on_a_signal(tmp_path, monkeypatch):
    from reinforge.training.signals import TrainingInterrupted

    saved = []
    for kw, expected in [({"save_steps": 2}, [2, 4]), ({"save_strategy": "epoch"}, [3]), ({}, [])]:
        run = _control(tmp_path, **kw)
        saved.clear()
        monkeypatch.setattr(run, "save", lambda step, position, rank_state: saved.append(step) or tmp_path / "c")
        for step in range(1, 5):
            run.end_step(step, step * 2, epoch_done=step == 3, rank_state={})
        assert saved == expected, kw
    run = _control(tmp_path)
    monkeypatch.setattr(run, "save", lambda step, position, rank_state: saved.append(step) or tmp_path / "ckpt-7")
    monkeypatch.setattr("sys.argv", ["reinforge", "train", "c.yaml"])
    run.stop.signum = signal.SIGINT
    with pytest.raises(TrainingInterrupted) as info:
        run.end_step(7, 14, epoch_done=False, rank_state={})
    assert saved[-1] == 7 and info.value.exit_code == 130
    assert "interrupted after step 7; checkpoint written to" in str(info.value)
    assert "resume with: reinforge train c.yaml resume_from_checkpoint=true" in str(info.value)


def test_reference_under_zero3_becomes_an_inference_engine(monkeypatch):
    """The reference model is handed to deepspeed.initialize with the policy's ZeRO-3 config, without optimizer
    or scheduler (stage 3 keeps its partitioning, other stages run as stage 0); deepspeed itself needs GPUs,
    so its `initialize` is replaced by a recorder here."""
    import sys

    from reinforge.training.distributed import prepare_frozen_model

    calls = []

    class Engine:
        def __init__(self, model):
            self.model, self.training = model, True

        def eval(self):
            self.training = False

    fake = types.SimpleNamespace(initialize=lambda model, config: calls.append(config) or (Engine(model), None, None, None))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    for stage, expected in ((3, {"stage": 3, "offload_param": {"device": "cpu"}}), (2, {"stage": 0})):
        ds = {"zero_optimization": {"stage": stage, "offload_param": {"device": "cpu"}}, "optimizer": {"type": "AdamW"},
              "scheduler": {"type": "WarmupLR"}, "train_micro_batch_size_per_gpu": 2}
        acc = types.SimpleNamespace(distributed_type="DistributedType.DEEPSPEED",
                                    state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=ds)))
        model = torch.nn.Linear(2, 2)
        engine = prepare_frozen_model(acc, model)
        assert engine.model is model and not engine.training
        assert calls[-1] == {"zero_optimization": expected, "train_micro_batch_size_per_gpu": 2}
        assert "optimizer" in ds  # the policy's config is left as it was
    plain = types.SimpleNamespace(distributed_type="DistributedType.MULTI_CPU",
                                  prepare_model=lambda m, evaluation_mode: ("placed", evaluation_mode))
    assert prepare_frozen_model(plain, torch.nn.Linear(2, 2)) == ("placed", True)


def test_online_methods_refuse_sharded_weights():
    online = {"rl": "grpo", "trl": {"reward_funcs": ["m.f"], "num_generations": 2}, "micro_batch_size": 2}
    with pytest.raises(ConfigError, match="FSDP and DeepSpeed ZeRO-3 are not supported for online methods"):
        cfg_of(**online, deepspeed={"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="not supported for online methods"):
        cfg_of(**online, fsdp=True)
    assert cfg_of(**online, deepspeed={"zero_optimization": {"stage": 2}}).deepspeed_dict
