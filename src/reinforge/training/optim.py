"""Optimiser and learning-rate schedule from the config (torch optimisers, transformers schedules)."""

from __future__ import annotations

import math

import torch

from reinforge.config.schema import ReinforgeConfig


def build_optimizer(cfg: ReinforgeConfig, params) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD/Adafactor over the trainable parameters (`weight_decay` skips biases and norms)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer in ("adamw_torch", "adamw", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                 fused=cfg.optimizer == "adamw_torch_fused" and torch.cuda.is_available())
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False)


def warmup_steps(cfg: ReinforgeConfig, total_steps: int) -> int:
    """Warm-up length in optimiser steps (`warmup_steps`, else ceil(warmup_ratio × total))."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def build_scheduler(cfg: ReinforgeConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """transformers' schedule named by `lr_scheduler`, stepped once per optimiser step."""
    from transformers import get_scheduler

    name = cfg.lr_scheduler
    kwargs = {"min_lr_rate": 0.1} if name == "cosine_with_min_lr" else None
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
