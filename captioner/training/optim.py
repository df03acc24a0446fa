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


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The per-step LR multiplier of :func:`make_scheduler`, with its decay horizon as state.

    ``total`` (the steps the cosine spans) and ``fitted`` are plain attributes, so they are saved in
    ``state_dict()`` and restored by ``load_state_dict()``: a horizon refitted to a time budget
    (:func:`fit_to_budget`) resumes as it was. Checkpoints written before it keep the configured horizon.
    """

    def __init__(self, opt: torch.optim.Optimizer, cfg: OptimConfig, total: int, steps_per_epoch: int) -> None:
        self.total, self.fitted = max(1, total), False
        warmup, kind, gamma, step_size = cfg.warmup_steps, cfg.scheduler, cfg.gamma, cfg.step_size

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if kind == "cosine":
                p = min(1.0, (step - warmup) / max(1, self.total - warmup))
                return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p))
            if kind == "step":
                return gamma ** (step // max(1, step_size * steps_per_epoch))
            return 1.0

        super().__init__(opt, factor)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> StepSchedule:
    """Per-step LR multiplier: linear warm-up, then cosine (to 2% of the peak) / step decay / constant."""
    if cfg.scheduler not in ("cosine", "step", "none"):
        raise ValueError(f"unknown optim.scheduler {cfg.scheduler!r}; expected cosine, step or none")
    return StepSchedule(opt, cfg, epochs * steps_per_epoch, steps_per_epoch)


def fit_to_budget(sched: StepSchedule, steps_per_epoch: int, step_seconds: float, epoch_overhead: float,
                  remaining_seconds: float) -> int | None:
    """Shorten a cosine horizon to the steps that fit in ``remaining_seconds``; the new horizon, or None if unchanged.

    Each further epoch costs ``steps_per_epoch * step_seconds + epoch_overhead`` (validation); the steps
    that fit are those epochs' steps (a fraction of an epoch counts: the stage's time budget cuts it and
    validates it). The horizon only shrinks (a fast machine keeps the configured epochs) and is fitted once.
    """
    if sched.fitted:
        return None
    sched.fitted = True
    done = sched.last_epoch  # steps taken so far
    epoch_cost = steps_per_epoch * step_seconds + epoch_overhead
    fit = done + int(max(0.0, remaining_seconds) / max(epoch_cost, 1e-9) * steps_per_epoch)
    if fit >= sched.total:
        return None
    sched.total = max(fit, done + 1)
    return sched.total
