"""The optimiser (Adam, a separate learning rate for a fine-tuned encoder) and the per-step LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from captioner.config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam; a fine-tuned ``model.encoder`` (captioner or VQA model) gets its own learning rate."""
    encoder = getattr(model, "encoder", None)
    enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    enc = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
    if enc:
        groups.append({"params": enc, "lr": cfg.encoder_lr})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR multiplier: linear warm-up, then cosine (to 2% of the peak) / step decay / constant."""
    total = max(1, epochs * steps_per_epoch)
    o = cfg
    if o.scheduler not in ("cosine", "step", "none"):
        raise ValueError(f"unknown optim.scheduler {o.scheduler!r}; expected cosine, step or none")

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.scheduler == "cosine":
            p = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p))
        if o.scheduler == "step":
            return o.gamma ** (step // max(1, o.step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
