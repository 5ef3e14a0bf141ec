"""The offline preference loop (DPO family, KTO, ORPO, SimPO): one screen, linear.

Per optimiser step: `gradient_accumulation_steps` micro-batches; each runs the policy forward
(log-probs of completion tokens only), the reference forward when the method needs it, the objective,
and backward of loss / accumulation steps. Then clip, step (unless non-finite), schedule, log, evaluate,
checkpoint. Rows come from a `BatchPlan` (each process its slice of every global micro-batch); resume,
non-finite steps, checkpoints and signals are `RunControl`'s.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig
from reinforge.data.packing import build_collator
from reinforge.models.forward import LogpsModel
from reinforge.models.loading import load_reference
from reinforge.training.distributed import BatchPlan, BatchStream, loss_for_backward, prepare_frozen_model
from reinforge.training.metrics import MetricsAccumulator, MetricsWriter
from reinforge.training.objectives import build_objective
from reinforge.training.optim import build_optimizer, build_scheduler
from reinforge.training.resume import RunControl, describe_rows
from reinforge.training.setup import start_run

log = logging.getLogger(__name__)


def _step_outputs(module, reference, objective, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = module(**batch)
    ref = batch.get("ref_logps")
    if objective.needs_reference and ref is None:
        with reference.active(getattr(module, "module", module)) as ref_module:  # no DDP wrapper for the reference
            out_ref = ref_module(**batch, stats=())  # the policy's metric statistics are not needed here
            # LD-DPO needs the reference's per-token log-probs; every other objective its sums
            ref = ({k: v.detach() for k, v in out_ref.items()} if getattr(objective, "needs_reference_tokens", False)
                   else out_ref["logps"].detach())
    return objective(out, ref, batch)


def _precompute_reference(cfg: ReinforgeConfig, spec, data, reference, module, collate):
    """Attach cached/computed reference log-probs to train and eval rows; the reference is then dropped."""
    from reinforge.training.reference_cache import attach_reference_logps, cache_key

    model_id = cfg.ref_model or cfg.base_model
    out = []
    with reference.active(module) as ref_module:
        for rows in (data.train, data.eval):
            if not rows:
                out.append(rows)
                continue
            key = cache_key(model_id, rows, extra=f"chunked={getattr(ref_module, 'chunked', None)}")
            rows, _ = attach_reference_logps(rows, ref_module, collate, cfg.eval_batch_size or cfg.micro_batch_size, key)
            out.append(rows)
    return out[0], out[1], None


def evaluate(module, reference, objective, loader, accelerator=None) -> dict[str, float]:
    """Objective metrics over the eval loader (no gradients), weighted by rows, named `eval_<metric>`; with
    `accelerator`, the means are reduced across processes (when each evaluated a share)."""
    acc = MetricsAccumulator()
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for batch in loader:
            loss, metrics = _step_outputs(module, reference, objective, batch)
            acc.add({"loss": loss, **metrics}, weight=batch["n_tokens"].numel())
    module.train(was_training)
    return {f"eval_{k}": v for k, v in acc.means(accelerator).items()}


def train_offline(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Train `cfg.rl` (an offline method) end to end; returns the run summary."""
    spec = method(cfg.rl)
    resume, accelerator, out_dir, tokenizer, data, policy = start_run(cfg)
    reference = load_reference(cfg, policy) if spec.needs_reference else None
    objective = build_objective(cfg)
    module = LogpsModel(policy, chunked=cfg.chunked_logprobs, log_sum_sq=bool(cfg.dpo_use_weighting),
                        stats=getattr(objective, "token_stats", ()))
    collate = build_collator(cfg, spec.data, tokenizer.pad_token_id)
    if cfg.precompute_ref_log_probs:
        with accelerator.main_process_first():
            data.train, data.eval, reference = _precompute_reference(cfg, spec, data, reference, module, collate)
    rank, world = accelerator.process_index, accelerator.num_processes
    plan = BatchPlan(len(data.train), cfg.micro_batch_size, rank, world, cfg.seed)
    eval_loader = DataLoader(data.eval, batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
                             collate_fn=collate) if data.eval else None  # every process evaluates all of it
    total_steps = cfg.max_steps or max(1, math.ceil(math.ceil(plan.per_epoch / cfg.gradient_accumulation_steps)
                                                    * cfg.num_epochs))
    optimizer = build_optimizer(cfg, module.parameters())
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    if reference is not None and reference.model is not None:
        reference.model = prepare_frozen_model(accelerator, reference.model)
    if hasattr(objective, "weighting_advice") and (advice := objective.weighting_advice(data.train)):
        log.warning(advice)
    run = RunControl(cfg, accelerator, out_dir, module=module, tokenizer=tokenizer, optimizer=optimizer,
                     scheduler=scheduler, objective=objective, data_layout=plan.layout(),
                     describe=lambda rows: describe_rows(data, rows))
    saved = run.start(resume)
    writer = MetricsWriter(out_dir, accelerator, resume_step=run.step if resume else None)
    log.info("%s: %d train rows, %d eval rows, %d steps of %d×%d rows on %d processes; reference: %s", cfg.rl,
             len(data.train), len(data.eval or []), total_steps, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
             world, reference.kind if reference else "none")

    unwrapped = accelerator.unwrap_model(module)
    if eval_loader is not None and run.step == 0:
        writer.log(evaluate(unwrapped, reference, objective, eval_loader), step=0)
    batches = BatchStream(plan, data.train, collate, start=saved.get("position", 0))
    params = [p for p in module.parameters() if p.requires_grad]
    bar = tqdm(range(run.step + 1, total_steps + 1), desc=f"{cfg.rl}", initial=run.step, total=total_steps,
               disable=not accelerator.is_main_process)
    acc, tokens, t0 = MetricsAccumulator.from_state(saved.get("metrics")), 0, time.perf_counter()
    with run:
        for step in bar:
            step_acc, losses, rows, start = MetricsAccumulator(), [], [], batches.position
            for micro in range(cfg.gradient_accumulation_steps):
                epoch, batch_rows, batch = next(batches)
                sync = micro == cfg.gradient_accumulation_steps - 1
                with accelerator.no_sync(module) if not sync else nullcontext():
                    with accelerator.autocast():
                        loss, metrics = _step_outputs(module, reference, objective, batch)
                    accelerator.backward(loss_for_backward(loss / cfg.gradient_accumulation_steps, accelerator,
                                                           cfg.gradient_accumulation_steps))
                step_acc.add({"loss": loss, **metrics})
                losses.append(loss.detach())
                rows += batch_rows
                tokens += int(batch["attention_mask"].sum())
            step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (TRL logs it; stepped below)
            if (grad_norm := run.optimizer_step(step, losses, params, rows)) is not None:
                step_acc.add({"grad_norm": grad_norm})
                acc.merge(step_acc)
            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - t0
                metrics = acc.means(accelerator)
                metrics.update(learning_rate=step_lr, epoch=epoch, tokens_per_second=tokens / elapsed,
                               skipped_nonfinite_steps=run.skipped_nonfinite_steps)
                writer.log(metrics, step)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                acc, tokens, t0 = MetricsAccumulator(), 0, time.perf_counter()
            if eval_loader is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
                writer.log(evaluate(unwrapped, reference, objective, eval_loader), step)
            run.end_step(step, batches.position, plan.epoch_of(batches.position) > plan.epoch_of(start),
                         {"metrics": acc.state_dict()})
    if eval_loader is not None:
        writer.log(evaluate(unwrapped, reference, objective, eval_loader), total_steps)
    run.save_final()
    accelerator.end_training()
    return run.summary(writer.history, data.stats)
