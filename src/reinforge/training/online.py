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
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from reinforge.algorithms.aggregation import aggregate_loss
from reinforge.algorithms.policy_gradient import clip_ratio_metrics, grpo_per_token_loss, masked_mean
from reinforge.config.schema import ReinforgeConfig
from reinforge.data.packing import batch_layout
from reinforge.generation.base import SamplingParams
from reinforge.models.forward import LogpsModel
from reinforge.models.loading import load_reference
from reinforge.rewards import RewardPool, load_reward_funcs, score
from reinforge.training.distributed import (BatchPlan, launched_world_size, loss_for_backward,
                                            prepare_frozen_model)
from reinforge.training.metrics import MetricsAccumulator, MetricsWriter
from reinforge.training.optim import build_optimizer, build_scheduler
from reinforge.training.resume import RunControl, describe_rows
from reinforge.training.rollout import RolloutBatch, RolloutMaker, RolloutStream, per_token
from reinforge.training.setup import RunError, start_run

log = logging.getLogger(__name__)


def generation_batch_size(cfg: ReinforgeConfig) -> int:
    """Completions per rollout over all processes (validated by the config to be a multiple of num_generations
    and micro_batch_size): `trl.generation_batch_size`, else micro_batch_size × accumulation × processes."""
    return cfg.trl.generation_batch_size or cfg.micro_batch_size * cfg.gradient_accumulation_steps * max(
        1, launched_world_size())


def _prompts_per_process(cfg: ReinforgeConfig, world_size: int) -> int:
    """Prompts per process per rollout; each process holds whole groups. Raises RunError when it cannot."""
    gen, G = generation_batch_size(cfg), cfg.trl.num_generations
    if (gen // G) % world_size or (gen // world_size) % cfg.micro_batch_size:
        raise RunError(f"the generation batch ({gen} completions = {gen // G} prompts × {G}) cannot be split into "
                       f"whole prompt groups of micro-batches of {cfg.micro_batch_size} on {world_size} processes; "
                       f"make the number of prompts a multiple of {world_size}")
    return gen // G // world_size


def train_online(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Train GRPO/GDPO end to end; returns the run summary."""
    t = cfg.trl
    resume, accelerator, out_dir, tokenizer, data, policy = start_run(cfg)
    beta = t.beta or 0.0
    reference = load_reference(cfg, policy) if beta > 0 else None
    module = LogpsModel(policy, chunked=cfg.chunked_logprobs)
    layout = batch_layout(cfg, tokenizer.pad_token_id)  # the completions of a prompt share it (prefix_sharing)
    funcs = load_reward_funcs(t.reward_funcs or [])
    pool = RewardPool(funcs, t.reward_num_workers) if t.reward_num_workers > 1 or t.reward_timeout else None
    maker = _rollout_maker(cfg, policy, tokenizer, funcs, pool)
    try:
        plan = BatchPlan(len(data.train), _prompts_per_process(cfg, accelerator.num_processes), accelerator.process_index,
                         accelerator.num_processes, cfg.seed, drop_last=True)
    except ValueError as exc:
        raise RunError(f"{len(data.train)} prompts cannot fill one rollout: {exc}") from None
    micro_per_rollout = plan.per_process * t.num_generations // cfg.micro_batch_size
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

    rollout_metrics = MetricsAccumulator.from_state(saved.get("rollout_metrics"))

    def on_rollout(r: RolloutBatch) -> None:
        rollout_metrics.add(r.metrics)
        if t.log_completions and accelerator.is_main_process:
            _log_completions(r, out_dir, t.num_completions_to_print)

    stream = RolloutStream(plan, data.train, maker, cfg.micro_batch_size, t.num_iterations, cfg.seed,
                           policy_fn if t.num_iterations > 1 else None, ref_fn if beta > 0 else None, on_rollout,
                           position=saved.get("position"), state=saved.get("rollout"))
    eps_high = t.epsilon_high if t.epsilon_high is not None else t.epsilon
    params_list = [p for p in module.parameters() if p.requires_grad]
    log.info("%s: %d prompts, %d steps; %d prompts × %d generations per rollout on each of %d processes; loss %s; "
             "beta %g", cfg.rl, len(data.train), total_steps, plan.per_process, t.num_generations,
             accelerator.num_processes, t.loss_type, beta)
    bar = tqdm(range(run.step + 1, total_steps + 1), desc=cfg.rl, initial=run.step, total=total_steps,
               disable=not accelerator.is_main_process)
    acc, t0 = MetricsAccumulator.from_state(saved.get("metrics")), time.perf_counter()
    with run.stop, pool or nullcontext():  # the reward workers stop however the loop ends
        for step in bar:
            step_acc, losses, consumed = MetricsAccumulator(), [], stream.consumed
            for micro in range(cfg.gradient_accumulation_steps):
                rollout, mb = next(stream)
                n_items = rollout.loss_tokens * cfg.gradient_accumulation_steps / micro_per_rollout
                sync = micro == cfg.gradient_accumulation_steps - 1
                with accelerator.no_sync(module) if not sync else nullcontext(), accelerator.autocast():
                    out = module(**layout(mb.batch), temperature=t.temperature, stats=("entropy",))
                    logps, entropy = per_token(out, mb.batch["n_tokens"]), per_token(out, mb.batch["n_tokens"], "token_entropy")
                    terms = grpo_per_token_loss(logps, mb.advantages, mb.mask, epsilon_low=t.epsilon, epsilon_high=eps_high,
                                                old_per_token_logps=mb.old_logps, importance_sampling_level=t.importance_sampling_level,
                                                beta=beta, ref_per_token_logps=mb.ref_logps)
                    loss = aggregate_loss(terms.per_token_loss, mb.mask, t.loss_type, max_completion_length=t.max_completion_length,
                                          num_items_in_batch=n_items, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
                    accelerator.backward(loss_for_backward(loss, accelerator, cfg.gradient_accumulation_steps))
                losses.append(loss.detach())
                step_acc.add({"loss": loss.detach() * cfg.gradient_accumulation_steps, "entropy": masked_mean(entropy, mb.mask)})
                step_acc.add(clip_ratio_metrics(terms.ratio, mb.advantages, mb.mask, t.epsilon, eps_high))
                if terms.per_token_kl is not None:
                    step_acc.add({"kl": masked_mean(terms.per_token_kl, mb.mask)})
            if (grad_norm := run.optimizer_step(step, losses, params_list, stream.current_rows())) is not None:
                step_acc.add({"grad_norm": grad_norm})
                acc.merge(step_acc)
            if step % cfg.logging_steps == 0 or step == total_steps:
                metrics = {**acc.means(accelerator), **rollout_metrics.means(accelerator)}
                metrics.update(learning_rate=scheduler.get_last_lr()[0], step_time=(time.perf_counter() - t0) / cfg.logging_steps,
                               skipped_nonfinite_steps=run.skipped_nonfinite_steps)
                writer.log(metrics, step)
                bar.set_postfix(reward=f"{metrics.get('reward', float('nan')):.3f}")
                acc, rollout_metrics, t0 = MetricsAccumulator(), MetricsAccumulator(), time.perf_counter()
            epoch_done = plan.epoch_of(stream.consumed) > plan.epoch_of(consumed)
            run.end_step(step, stream.position, epoch_done, {"metrics": acc.state_dict(), "rollout": stream.state(),
                                                             "rollout_metrics": rollout_metrics.state_dict()})
    run.save_final()
    accelerator.end_training()
    return run.summary(writer.history, data.stats)


def _rollout_maker(cfg: ReinforgeConfig, policy, tokenizer, funcs, pool) -> RolloutMaker:
    """The RolloutMaker of the config: in-process generation (or the user's rollout_func), reward scoring."""
    from reinforge.generation.factory import build_generator, load_rollout_func

    t = cfg.trl
    params = SamplingParams(n=t.num_generations, max_new_tokens=t.max_completion_length, temperature=t.temperature,
                            top_p=t.top_p, top_k=t.top_k, min_p=t.min_p, repetition_penalty=t.repetition_penalty,
                            extra=t.generation_kwargs or {})
    return RolloutMaker(tokenizer, build_generator(cfg, policy, tokenizer), funcs, [f.name for f in funcs],
                        t.reward_weights or [1.0] * len(funcs), params, scale_rewards=t.scale_rewards,
                        aggregation=t.multi_objective_aggregation,
                        score_fn=lambda fs, p, c, ids, cols: score(fs, p, c, cols, timeout=t.reward_timeout,
                                                                   completion_ids=ids, pool=pool),
                        chat_kwargs=t.chat_template_kwargs, max_prompt_length=t.max_prompt_length,
                        mask_truncated=t.mask_truncated_completions, rollout_func=load_rollout_func(t.rollout_func))


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
