"""EBFT's strided mode (`rl: ebft`, `ebft.mode: strided`): feature matching on unstructured text, one screen.

Each document (a row's prompt + ground truth; a plain text row has an empty prompt) gets anchors every
`ebft.stride` tokens from its first anchor on (`context_length` for plain text, the end of the prompt +
`min_completion_prefix` for prompt/completion rows). Per micro-batch of documents, for each document:

1. sample `n_samples_per_prompt` blocks of `generate_max_len` tokens at every anchor, all in one sequence with the
   block attention mask (`reinforge.algorithms.ebft_strided`), from the policy without gradient, with a private
   `torch.Generator` seeded per micro-batch and document (a resumed run, or a run on more processes, samples
   the same blocks);
2. one forward of the feature network (adapter-disabled policy or frozen copy) over the same layout gives the
   features of every generated block and of every anchor's ground-truth block; rewards per anchor group
   (`feature_matching_rewards`), advantages by `advantage_estimator`;
3. one forward of the policy with gradient over the layout: REINFORCE on the blocks' log-probs
   (`strided_policy_loss`, each block's advantage on its own tokens) × rl_coef, plus ce_coef × the cross-entropy
   of the document's (completion) tokens from the same forward.

Checkpoints, resume, signals and non-finite steps: `RunControl`, as the other loops.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from reinforge.algorithms.ebft import feature_layer_indices, feature_matching_rewards, group_advantages, pool_features
from reinforge.algorithms.ebft_strided import (block_layout, document_ce, layout_ids, strided_anchors,
                                               strided_policy_loss, token_logps)
from reinforge.config.schema import ReinforgeConfig
from reinforge.models.loading import load_reference
from reinforge.rollout.feature_rewards import decoder_body, num_hidden_layers
from reinforge.rollout.stream import rollout_seed
from reinforge.training.distributed import BatchPlan, BatchStream, loss_for_backward, prepare_frozen_model
from reinforge.training.metrics import MetricsAccumulator, MetricsWriter
from reinforge.training.optim import build_optimizer, build_scheduler
from reinforge.training.resume import RunControl, describe_rows
from reinforge.training.setup import RunError, start_run

log = logging.getLogger(__name__)


def document(row: dict[str, Any], tokenizer, cfg: ReinforgeConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(token ids [L], CE mask [L], first anchor) of a row: its rendered prompt (`prompt_ids`) then its
    `ground_truth` (no special tokens), cut to `sequence_len`. Raises KeyError without `ground_truth`."""
    e = cfg.ebft
    prompt = list(row.get("prompt_ids") or [])
    ids = (prompt + tokenizer(str(row["ground_truth"]), add_special_tokens=False)["input_ids"])[: cfg.sequence_len]
    mask = torch.zeros(len(ids), dtype=torch.long)
    mask[len(prompt):] = 1
    first = len(prompt) + e.min_completion_prefix if row.get("prompt") else e.context_length  # plain text: no prompt
    return torch.tensor(ids, dtype=torch.long), mask, first


def _lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, LM head) of a causal LM, possibly peft-wrapped."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return decoder_body(model), inner.get_output_embeddings()


class StridedPolicy(torch.nn.Module):
    """The policy (`.model`, what RunControl saves) with the training forward of strided mode, so that the forward
    with gradient runs through the (DDP-)prepared module and its gradients are averaged across processes.

    forward(ids [T], allowed [T, T] bool, positions [T], rows [R]) → logits [R, V] of the layout's hidden states at
    `rows` (the LM head runs only where a token is predicted)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        body, head = _lm_parts(self.model)
        hidden = body(input_ids=ids.unsqueeze(0), attention_mask=allowed.unsqueeze(0).unsqueeze(0),
                      position_ids=positions.unsqueeze(0)).last_hidden_state[0]
        return head(hidden[rows])


def _layout_forward(body, ids: torch.Tensor, layout, **kwargs):
    return body(input_ids=ids.unsqueeze(0), attention_mask=layout.allowed.unsqueeze(0).unsqueeze(0),
                position_ids=layout.positions.unsqueeze(0), **kwargs)


@torch.no_grad()
def sample_blocks(model, doc: torch.Tensor, layout, temperature: float, top_p: float,
                  generator: torch.Generator, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample every block of `layout` in parallel with a KV cache: one forward of the document, then g − 1
    forwards of B tokens (token i − 1 of every block, at positions a_k + i − 1), each seeing the document before
    its block's anchor and its own block's earlier tokens — the layout's attention (`block_layout`), computed once
    per token instead of once per step over the whole layout. Token 0 of a block is drawn from the document's
    output at a_k − 1.

    Args: model: causal LM (possibly peft); doc [L] ids; layout: `block_layout` of the document; temperature > 0;
        top_p in (0, 1]; generator: private RNG (the global one is not touched); pad_token_id: unused filler.
    Returns: (blocks [B, g] ids, logps [B, g] float64 log-probs of the drawn tokens under the sampling
        distribution: temperature-scaled, after top-p; softmax in float32, or float64 for a float64 model).
    """
    from transformers import DynamicCache, TopPLogitsWarper

    body, head = _lm_parts(model)
    device = next(body.parameters()).device
    L, B, g = layout.doc_len, layout.num_blocks, layout.block
    blocks = torch.full((B, g), pad_token_id, dtype=torch.long)
    logps = torch.zeros(B, g, dtype=torch.float64)
    top = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None
    anchor = layout.positions[layout.block_index[:, 0]]  # [B] a_k of each block
    context = (torch.arange(L).unsqueeze(0) < anchor.unsqueeze(1)).to(device)  # [B, L]
    same_block = torch.eye(B, dtype=torch.bool, device=device)
    # transformers 5 names the KV cache argument `cache` (4.x and early 5.x: `past_key_values`)
    kv = {("cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"): DynamicCache()}
    hidden = body(input_ids=doc.unsqueeze(0).to(device), attention_mask=layout.allowed[:L, :L][None, None].to(device),
                  position_ids=torch.arange(L, device=device).unsqueeze(0), use_cache=True,
                  **kv).last_hidden_state[0][(anchor - 1).to(device)]
    for i in range(g):
        if i:
            mask = torch.cat([context, same_block.repeat(1, i)], dim=1)  # keys: document, then steps 0..i-1
            hidden = body(input_ids=blocks[:, i - 1].unsqueeze(0).to(device), attention_mask=mask[None, None],
                          position_ids=(anchor + i - 1).unsqueeze(0).to(device), use_cache=True,
                          **kv).last_hidden_state[0]
        scores = head(hidden)
        scores = (scores if scores.dtype == torch.float64 else scores.float()) / temperature
        if top is not None:
            scores = top(None, scores)
        logp = torch.log_softmax(scores, -1).cpu()
        blocks[:, i] = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        logps[:, i] = logp.gather(1, blocks[:, i:i + 1]).squeeze(1)
    return blocks, logps


def train_strided(cfg: ReinforgeConfig) -> dict[str, Any]:
    """Train EBFT in strided mode end to end; returns the run summary."""
    e = cfg.ebft
    resume, accelerator, out_dir, tokenizer, data, policy = start_run(cfg)
    reference = load_reference(cfg, policy)  # the feature network
    layers = feature_layer_indices(e.feature_layers, num_hidden_layers(policy))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = BatchPlan(len(data.train), cfg.micro_batch_size, accelerator.process_index, accelerator.num_processes,
                     cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * plan.per_epoch / cfg.gradient_accumulation_steps))
    module = StridedPolicy(policy)
    optimizer = build_optimizer(cfg, module.parameters())
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    if reference.model is not None:
        reference.model = prepare_frozen_model(accelerator, reference.model)
    run = RunControl(cfg, accelerator, out_dir, module=module, tokenizer=tokenizer, optimizer=optimizer,
                     scheduler=scheduler, data_layout=plan.layout(), describe=lambda rows: describe_rows(data, rows))
    saved = run.start(resume)
    writer = MetricsWriter(out_dir, accelerator, resume_step=run.step if resume else None)
    unwrapped = accelerator.unwrap_model(module)
    lm = unwrapped.model  # the causal LM (plain or peft)
    documents = [document(row, tokenizer, cfg) for row in data.train]  # tokenised once, not every epoch
    batches = BatchStream(plan, documents, lambda docs: docs, start=saved.get("position", 0))
    params = [p for p in module.parameters() if p.requires_grad]

    def score(doc: torch.Tensor, first: int, seed: int):
        """Sample the blocks of one document and reward them: (layout, blocks, layout ids, rewards, advantages),
        None without an anchor. The policy samples in eval mode; the feature network sees the same layout."""
        anchors = strided_anchors(len(doc), first, e.stride, e.generate_max_len)
        if not anchors:
            return None
        layout = block_layout(len(doc), anchors, e.n_samples_per_prompt, e.generate_max_len)
        was_training = unwrapped.training
        unwrapped.eval()
        blocks, _ = sample_blocks(lm, doc, layout, e.temperature, e.top_p, torch.Generator().manual_seed(seed), pad)
        ids = layout_ids(doc, blocks)
        with torch.no_grad(), reference.active(unwrapped) as network:
            hs = _layout_forward(decoder_body(network), ids.to(accelerator.device), layout,
                                 output_hidden_states=True).hidden_states
            h = torch.cat([hs[i][0] for i in layers], dim=-1).float().cpu()
        unwrapped.train(was_training)
        ones = torch.ones(layout.block_index.shape, dtype=torch.long)
        gen = pool_features(h[layout.block_index], ones, e.embed_method, torch.zeros(layout.num_blocks, dtype=torch.long))
        gt = pool_features(h[layout.gt_index], ones[: len(anchors)], e.embed_method,
                           torch.zeros(len(anchors), dtype=torch.long))
        rw = feature_matching_rewards(gen, gt, e.n_samples_per_prompt, alignment_coef=e.alignment_coef,
                                      diversity_coef=e.diversity_coef, whiten=e.use_whitening)
        adv = group_advantages(rw.rewards, e.n_samples_per_prompt, e.advantage_estimator).to(accelerator.device)
        return layout, blocks, ids, rw, adv

    def reward_metrics(rw, adv, layout) -> dict[str, Any]:
        return {"ebft/alignment": rw.alignment.mean(), "ebft/diversity": rw.diversity.mean(),
                "ebft/cfm_loss": rw.cfm_loss.mean(), "ebft/reward": rw.rewards.mean(),
                "ebft/mean_reward": rw.rewards.mean(), "ebft/advantages_std": adv.float().std(),
                "ebft/num_blocks": float(layout.num_blocks)}

    def document_loss(doc: torch.Tensor, ce_mask: torch.Tensor, first: int, seed: int,
                      scale: float) -> dict[str, float] | None:
        """Sample, score and backpropagate one document (loss × scale); its metrics, None without an anchor."""
        scored = score(doc, first, seed)
        if scored is None:
            return None
        layout, blocks, ids, rw, adv = scored
        device, n_pred = accelerator.device, layout.pred_index.numel()
        # the LM head only on the rows that predict block tokens (and the document's, for the cross-entropy)
        rows = layout.pred_index.flatten()
        if e.ce_coef:
            rows = torch.cat([rows, torch.arange(len(doc))])
        with accelerator.autocast():
            logits = module(ids.to(device), layout.allowed.to(device), layout.positions.to(device), rows.to(device))
            logps = token_logps(logits[:n_pred], blocks, e.temperature)
            rl = strided_policy_loss(logps, adv)
            ce = document_ce(logits[n_pred:], doc.to(device), ce_mask.to(device)) if e.ce_coef else rl.new_zeros(())
            loss = e.rl_coef * rl + e.ce_coef * ce
        accelerator.backward(loss_for_backward(loss * scale, accelerator, cfg.gradient_accumulation_steps))
        return {"loss": loss.detach(), "ebft/rl_loss": rl.detach(), "ebft/ce_loss": ce.detach(),
                **reward_metrics(rw, adv, layout)}

    eval_documents = [document(row, tokenizer, cfg) for row in data.eval or []]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """The reward metrics and the document cross-entropy (`eval_ebft/ce_loss`, nats per token of the
        document's completion tokens, the plain causal forward of the policy) over every held-out document,
        each sampled with the same seed at every evaluation (so two evaluations differ only by the model).
        Every process evaluates all of them; names `eval_<metric>`."""
        ev = MetricsAccumulator()
        was_training = unwrapped.training
        unwrapped.eval()  # `score` keeps the mode it finds
        body, head = _lm_parts(lm)
        for j, (doc, ce_mask, first) in enumerate(eval_documents):
            scored = score(doc, first, rollout_seed(cfg.seed, -1, j))
            with accelerator.autocast():
                hidden = body(input_ids=doc.unsqueeze(0).to(accelerator.device)).last_hidden_state[0]
                ce = document_ce(head(hidden), doc.to(hidden.device), ce_mask.to(hidden.device))
            ev.add({"ebft/ce_loss": ce, **(reward_metrics(scored[3], scored[4], scored[0]) if scored else {})})
        unwrapped.train(was_training)
        return {f"eval_{k}": v for k, v in ev.means().items()}

    bar = tqdm(range(run.step + 1, total_steps + 1), desc="ebft strided", initial=run.step, total=total_steps,
               disable=not accelerator.is_main_process)
    acc, t0 = MetricsAccumulator.from_state(saved.get("metrics")), time.perf_counter()
    log.info("ebft strided: %d documents, %d steps of %d×%d documents; stride %d, %d blocks of %d per anchor; "
             "feature network: %s", len(data.train), total_steps, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
             e.stride, e.n_samples_per_prompt, e.generate_max_len, reference.kind)
    with run:
        if eval_documents and run.step == 0:
            writer.log(evaluate(), step=0)
        for step in bar:
            step_acc, losses, rows, start = MetricsAccumulator(), [], [], batches.position
            for micro in range(cfg.gradient_accumulation_steps):
                k = batches.position
                _, batch_rows, docs = next(batches)
                sync = micro == cfg.gradient_accumulation_steps - 1
                with accelerator.no_sync(module) if not sync else nullcontext():
                    # seeded by (micro-batch, document): the same blocks on any number of processes, and on resume
                    for row_id, (doc, ce_mask, first) in zip(plan.rows(k), docs):
                        m = document_loss(doc, ce_mask, first, rollout_seed(cfg.seed, k, row_id), 1.0 / len(docs))
                        if m is None:
                            step_acc.add({"ebft/documents_without_anchor": 1.0})
                            continue
                        step_acc.add(m)
                        losses.append(m["loss"])
                rows += batch_rows
            if not losses:
                raise RunError(f"no document of step {step} is long enough for one anchor (first anchor + "
                               f"generate_max_len {e.generate_max_len} tokens); lower ebft.context_length")
            step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (TRL logs it; stepped below)
            if (grad_norm := run.optimizer_step(step, losses, params, rows)) is not None:
                step_acc.add({"grad_norm": grad_norm})
                acc.merge(step_acc)
            if step % cfg.logging_steps == 0 or step == total_steps:
                metrics = acc.means(accelerator)
                metrics.update(learning_rate=step_lr,
                               step_time=(time.perf_counter() - t0) / cfg.logging_steps,
                               skipped_nonfinite_steps=run.skipped_nonfinite_steps)
                writer.log(metrics, step)
                bar.set_postfix(cfm=f"{metrics.get('ebft/cfm_loss', float('nan')):.3f}")
                acc, t0 = MetricsAccumulator(), time.perf_counter()
            if eval_documents and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
                writer.log(evaluate(), step)
            run.end_step(step, batches.position, plan.epoch_of(batches.position) > plan.epoch_of(start),
                         {"metrics": acc.state_dict()})
        if eval_documents:
            writer.log(evaluate(), total_steps)
    run.save_final()
    accelerator.end_training()
    return run.summary(writer.history, data.stats)
