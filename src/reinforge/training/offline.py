"""The offline preference loop (DPO family, KTO, ORPO, SimPO): one screen, linear.

Per optimiser step: `gradient_accumulation_steps` micro-batches; each runs the policy forward
(log-probs of completion tokens only), the reference forward when the method needs it, the objective,
and backward of loss / accumulation steps. Then clip, step, schedule, log, evaluate, save.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reinforge.algorithms.registry import method
from reinforge.config.schema import ReinforgeConfig
from reinforge.data.collate import PairedCollator, UnpairedCollator
from reinforge.data.prepare import prepare_data
from reinforge.models.forward import LogpsModel
from reinforge.models.loading import load_policy, load_reference, load_tokenizer
from reinforge.training.checkpoint import save_model
from reinforge.training.metrics import MetricsAccumulator, MetricsWriter, flat_config
from reinforge.training.objectives import build_objective
from reinforge.training.optim import build_optimizer, build_scheduler
from reinforge.training.setup import make_accelerator, prepare_output_dir
from reinforge.training.summary import print_summary

log = logging.getLogger(__name__)


def _batches(loader: DataLoader) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless (epoch, batch) stream; the sampler reshuffles each epoch from the seed."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def _step_outputs(module, reference, objective, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = module(**batch)
    ref = batch.get("ref_logps")
    if objective.needs_reference and ref is None:
        with reference.active(module) as ref_module:
            ref = ref_module(**batch)["logps"].detach()
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


def evaluate(module, reference, objective, loader) -> dict[str, float]:
    """Objective metrics over the eval loader (no gradients), weighted by rows, named `eval_<metric>`."""
    acc = MetricsAccumulator()
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for batch in loader:
            loss, metrics = _step_outputs(module, reference, objective, batch)
            acc.add({"loss": loss, **metrics}, weight=batch["n_tokens"].numel())
    module.train(was_training)
    return {f"eval_{k}": v for k, v in acc.means().items()}


def train_offline(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Train `cfg.rl` (an offline method) end to end; returns the run summary."""
    spec = method(cfg.rl)
    out_dir = prepare_output_dir(cfg)
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    policy = load_policy(cfg)
    reference = load_reference(cfg, policy) if spec.needs_reference else None
    module = LogpsModel(policy)
    collate = (PairedCollator if spec.data == "paired" else UnpairedCollator)(tokenizer.pad_token_id)
    if cfg.precompute_ref_log_probs:
        data.train, data.eval, reference = _precompute_reference(cfg, spec, data, reference, module, collate)
    train_loader = DataLoader(data.train, batch_size=cfg.micro_batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = DataLoader(data.eval, batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
                             collate_fn=collate) if data.eval else None
    per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.num_epochs))
    optimizer = build_optimizer(cfg, module.parameters())
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    module, optimizer, train_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if reference is not None and reference.model is not None:
        reference.model = accelerator.prepare_model(reference.model, evaluation_mode=True)
    objective = build_objective(cfg)
    accelerator.init_trackers("runs", config=flat_config(cfg.model_dump(mode="json")))
    writer = MetricsWriter(out_dir, accelerator)
    log.info("%s: %d train rows, %d eval rows, %d steps of %d×%d rows; reference: %s", cfg.rl, len(data.train),
             len(data.eval or []), total_steps, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
             reference.kind if reference else "none")

    if eval_loader is not None:
        writer.log(evaluate(module, reference, objective, eval_loader), step=0)
    batches = _batches(train_loader)
    params = [p for p in module.parameters() if p.requires_grad]
    bar = tqdm(range(1, total_steps + 1), desc=f"{cfg.rl}", disable=not accelerator.is_main_process)
    acc, tokens, t0 = MetricsAccumulator(), 0, time.perf_counter()
    for step in bar:
        for micro in range(cfg.gradient_accumulation_steps):
            epoch, batch = next(batches)
            sync = micro == cfg.gradient_accumulation_steps - 1
            with accelerator.no_sync(module) if not sync else nullcontext():
                with accelerator.autocast():
                    loss, metrics = _step_outputs(module, reference, objective, batch)
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
            acc.add({"loss": loss, **metrics})
            tokens += int(batch["attention_mask"].sum())
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        acc.add({"grad_norm": grad_norm})
        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - t0
            metrics = acc.means(accelerator)
            metrics.update(learning_rate=scheduler.get_last_lr()[0], epoch=epoch, tokens_per_second=tokens / elapsed)
            writer.log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            acc, tokens, t0 = MetricsAccumulator(), 0, time.perf_counter()
        if eval_loader is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
            writer.log(evaluate(module, reference, objective, eval_loader), step)
    if eval_loader is not None:
        writer.log(evaluate(module, reference, objective, eval_loader), total_steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(module).model, tokenizer, cfg, out_dir)
    accelerator.end_training()
    return print_summary(cfg, writer.history, data.stats, out_dir)
