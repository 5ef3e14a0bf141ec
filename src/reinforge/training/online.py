"""The online RL loop (GRPO, GDPO): one screen, linear.

A stream of micro-batches is cut from rollout batches (each reused `num_iterations` times); per
optimiser step, `gradient_accumulation_steps` micro-batches run the policy forward, the clipped
surrogate (+ k3 KL when beta > 0), the chosen loss aggregation, and backward. Generation size:
`generation_batch_size` completions per rollout over all processes (default micro_batch_size ×
accumulation steps × processes), i.e. generation_batch_size / num_generations prompts, split into whole
prompt groups per process. Rollouts are stored one row per completion; every forward sees them laid out per
`prefix_sharing` / `sample_packing` (on by default: a prompt once for its completions in the micro-batch).
Resume, non-finite steps, checkpoints and signals: `RunControl`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import closing, nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig
from reinforge.data.packing import batch_layout
from reinforge.models.forward import LogpsModel
from reinforge.models.loading import load_reference
from reinforge.rewards import RewardPool, load_reward_funcs
from reinforge.rollout.curate import ReplayBuffer, RerollBuffer
from reinforge.rollout.factory import build_backend, build_preparer, build_producer, eos_token_ids
from reinforge.rollout.feature_rewards import FeatureMatchingScorer, adaptive_max_tokens, num_hidden_layers
from reinforge.rollout.prepare import RolloutBatch
from reinforge.rollout.stream import RolloutStream
from reinforge.rollout.vllm import VLLMError
from reinforge.training.distributed import (BatchPlan, any_across, is_deepspeed, launched_world_size,
                                            loss_for_backward, prepare_frozen_model)
from reinforge.training.metrics import MetricsAccumulator, MetricsWriter
from reinforge.training.optim import build_optimizer, build_scheduler
from reinforge.training.resume import RunControl, describe_rows
from reinforge.training.online_eval import evaluate_online
from reinforge.training.online_objective import build_online_objective
from reinforge.training.setup import RunError, start_run
from reinforge.user_code import UserCodeError

log = logging.getLogger(__name__)


def generation_batch_size(cfg: ReinforgeConfig) -> int:
    """Completions per rollout over all processes (validated by the config to be a multiple of num_generations
    and micro_batch_size): `trl.generation_batch_size`, else micro_batch_size × accumulation × processes."""
    return cfg.trl.generation_batch_size or cfg.micro_batch_size * cfg.gradient_accumulation_steps * max(
        1, launched_world_size())


def prompts_per_process(cfg: ReinforgeConfig, world_size: int) -> int:
    """Prompts per process per rollout; each process holds whole groups (`reinforge validate` checks it too).
    Raises RunError when it cannot."""
    gen, G = generation_batch_size(cfg), cfg.trl.num_generations
    if (gen // G) % world_size or (gen // world_size) % cfg.micro_batch_size:
        raise RunError(f"the generation batch ({gen} completions = {gen // G} prompts × {G}) cannot be split into "
                       f"whole prompt groups of micro-batches of {cfg.micro_batch_size} on {world_size} processes; "
                       f"make the number of prompts a multiple of {world_size}")
    return gen // G // world_size


def train_online(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Train an online method (GRPO/GDPO, structured EBFT) end to end; returns the run summary."""
    t = cfg.trl
    resume, accelerator, out_dir, tokenizer, data, policy = start_run(cfg)
    beta = t.beta or 0.0
    feature_matching = method(cfg.rl).rewards == "feature_matching"  # EBFT: the reference is the feature network
    reference = load_reference(cfg, policy) if beta > 0 or feature_matching else None
    module = LogpsModel(policy, chunked=cfg.chunked_logprobs)
    layout = batch_layout(cfg, tokenizer.pad_token_id)  # the completions of a prompt share it (prefix_sharing)
    objective = build_online_objective(cfg)
    funcs = [] if feature_matching else load_reward_funcs(t.reward_funcs or [])
    pool = RewardPool(funcs, t.reward_num_workers) if t.reward_num_workers > 1 or t.reward_timeout else None
    try:
        backend, weight_sync, backend_resources = build_backend(cfg, policy, tokenizer, out_dir, accelerator.is_main_process)
    except VLLMError as exc:
        raise RunError(str(exc)) from None
    try:
        producer = build_producer(cfg, policy, tokenizer, backend, funcs, pool,
                                  max_new_tokens_fn=_adaptive_max_tokens(cfg, tokenizer) if feature_matching else None,
                                  resources=backend_resources)
    except (ImportError, TypeError) as exc:  # trl.rollout_func cannot be imported or has no accepted form
        backend_resources.close()
        raise RunError(str(exc)) from None
    try:
        plan = BatchPlan(len(data.train), prompts_per_process(cfg, accelerator.num_processes), accelerator.process_index,
                         accelerator.num_processes, cfg.seed, drop_last=True)
    except ValueError as exc:
        raise RunError(f"{len(data.train)} prompts cannot fill one rollout: {exc}") from None
    micro_per_rollout = plan.per_process * t.num_generations // cfg.micro_batch_size
    # each rollout trained once, inside one optimiser step, by the weights that prepare it: π_old is the training
    # forward's own log-probs, and no old-policy forward is needed (the sampler correction is computed in the loss)
    on_policy = t.num_iterations == 1 and cfg.gradient_accumulation_steps % micro_per_rollout == 0
    preparer = build_preparer(cfg, tokenizer, 1 if feature_matching else len(funcs), old_from_training=on_policy)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * plan.per_epoch * t.num_iterations * micro_per_rollout
                                                    / cfg.gradient_accumulation_steps))
    optimizer = build_optimizer(cfg, module.parameters())
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    if reference is not None and reference.model is not None:
        reference.model = prepare_frozen_model(accelerator, reference.model)
    run = RunControl(cfg, accelerator, out_dir, module=module, tokenizer=tokenizer, optimizer=optimizer,
                     scheduler=scheduler, data_layout=plan.layout(), describe=lambda rows: describe_rows(data, rows))
    saved = run.start(resume)
    writer = MetricsWriter(out_dir, accelerator, resume_step=run.step if resume else None)
    unwrapped = accelerator.unwrap_model(module)

    def policy_fn(batch):
        with torch.no_grad():
            return unwrapped(**layout(batch), temperature=t.temperature)

    def ref_fn(batch):
        with reference.active(unwrapped) as ref_module:
            return ref_module(**layout(batch), temperature=t.temperature)

    synced: dict[str, int | None] = {"version": None}
    depth = t.prefetch_depth if t.async_prefetch else 0  # async: the main process alone produces, in a thread

    def before_produce(drain) -> int:
        """Sync the backend's weights when due (every vllm_sync_interval steps, and before the first rollout of a
        run), after `drain()` has waited for any generation in flight; returns the version the next rollout samples
        from. Asynchronous runs call it on the main process only (no collective then)."""
        if not weight_sync.needed:
            return run.step
        last = synced["version"]
        if last is None or run.step - last >= t.vllm_sync_interval:
            drain()
            t0 = time.perf_counter()
            if depth:
                weight_sync.push(run.model, run.step)
            else:
                if accelerator.is_main_process:
                    weight_sync.push(run.model, run.step)
                accelerator.wait_for_everyone()  # the others sample from the main process's version once it is loaded
                if not accelerator.is_main_process:
                    weight_sync.push(run.model, run.step)
            synced["version"] = run.step
            rollout_metrics.add({"time/weight_sync": time.perf_counter() - t0})
        return synced["version"]

    rollout_metrics = MetricsAccumulator.from_state(saved.get("rollout_metrics"))

    def on_rollout(r: RolloutBatch) -> None:
        rollout_metrics.add(r.metrics)
        if t.log_completions and accelerator.is_main_process:
            _log_completions(r, out_dir, t.num_completions_to_print)

    replay = ReplayBuffer(t.replay_buffer_size, keep_old_logps=not t.replay_recompute_logps) \
        if t.use_data_producer and t.replay_buffer_size else None
    reroll = RerollBuffer(math.ceil(t.reroll_start_fraction * total_steps), t.reroll_max_groups) \
        if t.reroll_enabled and (not depth or accelerator.is_main_process) else None
    scorer = None
    if feature_matching:
        e = cfg.ebft
        scorer = FeatureMatchingScorer(lambda: reference.active(unwrapped), tokenizer,
                                       num_hidden_layers=num_hidden_layers(unwrapped), feature_layers=e.feature_layers,
                                       embed_method=e.embed_method, alignment_coef=e.alignment_coef,
                                       diversity_coef=e.diversity_coef, whiten=e.use_whitening,
                                       eos_token_ids=eos_token_ids(policy, tokenizer),
                                       chat_kwargs=t.chat_template_kwargs)
    try:
        stream = RolloutStream(plan, data.train, producer, preparer, cfg.micro_batch_size, t.num_iterations, cfg.seed,
                               policy_fn, ref_fn if beta > 0 else None, on_rollout,
                               old_always=not on_policy or (replay is not None and replay.keep_old_logps),
                               before_produce=before_produce, current_version=lambda: run.step, prefetch_depth=depth,
                               max_staleness=t.max_staleness, replay=replay, reroll=reroll, main_scorer=scorer,
                               position=saved.get("position"), state=saved.get("rollout"))
    except ValueError as exc:  # async with a producer that cannot run in a background thread
        raise RunError(str(exc)) from None
    skip_zero = t.skip_zero_advantage_batches and beta == 0 and not is_deepspeed(accelerator)

    def evaluate(step: int) -> None:
        """Eval prompts → `eval_*` metrics at `step` (see `reinforge.training.online_eval`). Synchronous runs: each
        process its share, reduced; async runs: the main process alone, after the rollouts in flight."""
        if depth and not accelerator.is_main_process:
            return
        version = before_produce(stream.drain)
        shard = (0, 1, None) if depth else (accelerator.process_index, accelerator.num_processes, accelerator)
        try:
            metrics = evaluate_online(data.eval, producer, plan.per_process, cfg.seed, version,
                                      reward_weights=preparer.reward_weights, scale_rewards=preparer.scale_rewards,
                                      aggregation=preparer.aggregation, scorer=scorer, rank=shard[0],
                                      world_size=shard[1], accelerator=shard[2])
        except UserCodeError as exc:  # a reward function raised on an eval prompt
            _stop_in_evaluation(run, step, stream, exc, _loop_state(acc, stream, rollout_metrics))
        writer.log(metrics, step)
    params_list = [p for p in module.parameters() if p.requires_grad]
    log.info("%s: %d prompts, %d steps; %d prompts × %d generations per rollout on each of %d processes (%s); loss %s; "
             "beta %g", cfg.rl, len(data.train), total_steps, plan.per_process, t.num_generations,
             accelerator.num_processes, backend.name, t.loss_type, beta)
    bar = tqdm(range(run.step + 1, total_steps + 1), desc=cfg.rl, initial=run.step, total=total_steps,
               disable=not accelerator.is_main_process)
    acc, t0 = MetricsAccumulator.from_state(saved.get("metrics")), time.perf_counter()
    # workers, connections, sync files and the background producer end however the loop ends
    with run, pool or nullcontext(), backend_resources, closing(stream), closing(bar):
        if data.eval and run.step == 0:
            evaluate(0)
        for step in bar:
            step_acc, losses, consumed, micros = MetricsAccumulator(), [], stream.consumed, []
            for micro in range(cfg.gradient_accumulation_steps):
                try:
                    micros.append(next(stream))
                except VLLMError as exc:
                    _stop_on_server_error(run, step, micro, stream, exc, _loop_state(acc, stream, rollout_metrics))
                except UserCodeError as exc:  # a reward or rollout function raised
                    _stop_on_user_code_error(run, step, micro, stream, exc, _loop_state(acc, stream, rollout_metrics))
            # a micro-batch without signal (zero advantages, no CE rows; equal on every process) has no gradient
            active = any_across([mb.has_signal for _, mb in micros], accelerator.device) \
                if skip_zero else [True] * len(micros)
            last_active = max((i for i, a in enumerate(active) if a), default=-1)
            for micro, (rollout, mb) in enumerate(micros):
                if not active[micro]:
                    losses.append(torch.zeros((), device=accelerator.device))
                    continue
                n_items = rollout.loss_tokens * cfg.gradient_accumulation_steps / micro_per_rollout
                with accelerator.no_sync(module) if micro != last_active else nullcontext(), accelerator.autocast():
                    out = module(**layout(mb.batch), temperature=t.temperature, stats=objective.stats)
                    loss, micro_metrics = objective(out, mb, n_items)
                    accelerator.backward(loss_for_backward(loss, accelerator, cfg.gradient_accumulation_steps))
                losses.append(loss.detach())
                step_acc.add(micro_metrics)
            if skip_zero:
                step_acc.add({"skipped_zero_adv_batches": float(active.count(False))})
            step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (TRL logs it; stepped below)
            if (grad_norm := run.optimizer_step(step, losses, params_list, stream.current_rows())) is not None:
                step_acc.add({"grad_norm": grad_norm})
                acc.merge(step_acc)
            if step % cfg.logging_steps == 0 or step == total_steps:
                metrics = {**acc.means(accelerator), **rollout_metrics.means(accelerator)}
                metrics.update(learning_rate=step_lr, step_time=(time.perf_counter() - t0) / cfg.logging_steps,
                               skipped_nonfinite_steps=run.skipped_nonfinite_steps)
                writer.log(metrics, step)
                bar.set_postfix(reward=f"{metrics.get('reward', float('nan')):.3f}")
                acc, rollout_metrics, t0 = MetricsAccumulator(), MetricsAccumulator(), time.perf_counter()
            epoch_done = plan.epoch_of(stream.consumed) > plan.epoch_of(consumed)
            if data.eval and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
                evaluate(step)
            run.end_step(step, stream.position, epoch_done, lambda: _loop_state(acc, stream, rollout_metrics))
        if data.eval:
            evaluate(total_steps)
    run.save_final()
    accelerator.end_training()
    return run.summary(writer.history, data.stats)


def _adaptive_max_tokens(cfg: ReinforgeConfig, tokenizer):
    """EBFT's adaptive_max_tokens: rows → the completion-length cap of their rollout (None when off)."""
    e = cfg.ebft
    if not e.adaptive_max_tokens:
        return None

    def cap(rows) -> int:
        lengths = [len(tokenizer(str(r.get("ground_truth", "")), add_special_tokens=False)["input_ids"]) for r in rows]
        return adaptive_max_tokens(lengths, e.gt_length_multiplier, cfg.trl.max_completion_length)

    return cap


def _loop_state(acc: MetricsAccumulator, stream: RolloutStream, rollout_metrics: MetricsAccumulator) -> dict[str, Any]:
    return {"metrics": acc.state_dict(), "rollout": stream.state(), "rollout_metrics": rollout_metrics.state_dict()}


NOTHING_TO_RESUME = "no step had completed, nothing to resume"


def _checkpoint(run: RunControl, step: int, stream: RolloutStream, state: dict[str, Any], fix: str) -> str:
    """Write checkpoint-`step` (the stream where `step` ended); returns where it is and how to resume."""
    path = run.save(step, stream.position, state)
    return f"checkpoint of step {step} written to {path}; fix {fix} and resume with resume_from_checkpoint=true"


def _checkpoint_before(run: RunControl, step: int, micro: int, stream: RolloutStream, state: dict[str, Any],
                       fix: str) -> str:
    """A rollout for `step` failed. When no micro-batch of this step has run, the stream is still where step - 1
    ended: checkpoint it (resumable exactly). Returns what was written and how to resume (`fix`: what to fix)."""
    if step > 1 and micro == 0:
        return _checkpoint(run, step - 1, stream, state, fix)
    if step == 1 and micro == 0:
        return NOTHING_TO_RESUME
    return ("no checkpoint written (the failure came in the middle of an accumulation step; the latest "
            "checkpoint in output_dir resumes)")


def _stop_on_server_error(run: RunControl, step: int, micro: int, stream: RolloutStream, exc: Exception,
                          state: dict[str, Any]) -> None:
    """The generation server failed while a rollout for `step` was produced: checkpoint (`_checkpoint_before`)
    and stop with the server's error. Raises RunError."""
    where = _checkpoint_before(run, step, micro, stream, state, "the server")
    raise RunError(f"generation failed at step {step}: {exc}\n{where}")


def _stop_on_user_code_error(run: RunControl, step: int, micro: int, stream: RolloutStream, exc: UserCodeError,
                             state: dict[str, Any]) -> None:
    """A reward or rollout function raised while a rollout for `step` was produced: checkpoint
    (`_checkpoint_before`) and stop with one line naming the function, the step and the exception
    (`_raise_user_code`)."""
    _raise_user_code(exc, f"at step {step}", _checkpoint_before(run, step, micro, stream, state, exc.name))


def _stop_in_evaluation(run: RunControl, step: int, stream: RolloutStream, exc: UserCodeError,
                        state: dict[str, Any]) -> None:
    """A reward function raised in the evaluation at `step` (after that step's update, or before the first):
    checkpoint step `step` when this is the only process (a checkpoint is written by all processes together, and the
    others are not here), and stop with one line naming the function, the evaluation and the exception."""
    if step == 0:
        where = NOTHING_TO_RESUME
    elif run.accelerator.num_processes == 1:
        where = _checkpoint(run, step, stream, state, exc.name)
    else:
        where = "no checkpoint written (the latest checkpoint in output_dir resumes)"
    _raise_user_code(exc, f"in the evaluation at step {step}", where)


def _raise_user_code(exc: UserCodeError, when: str, where: str) -> None:
    """Raises RunError `<what the function raised> <when>; <where>`; its `detail` holds the sample and traceback
    (`reinforge train --debug`)."""
    err = RunError(f"{exc.what} {when}; {where}")
    err.detail = exc.detail
    raise err from None


def _log_completions(rollout: RolloutBatch, out_dir, n_print: int | None) -> None:
    """Append the rollout's prompt/completion/reward rows to completions.jsonl and print a few."""
    with (out_dir / "completions.jsonl").open("a") as f:
        for row in rollout.table:
            f.write(json.dumps(row) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    for col in rollout.table[0]:
        table.add_column(col, overflow="fold", max_width=60 if col in ("prompt", "completion") else 12)
    for row in rollout.table[: n_print or 4]:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()])
    Console().print(table)
