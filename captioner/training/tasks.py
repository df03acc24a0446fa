"""The training job of each task (``task=caption`` | ``task=vqa``): what ``captioner-train`` runs."""

from __future__ import annotations

from typing import Any

from captioner.config import ConfigError


def run(cfg: Any) -> dict[str, float]:
    """Train the task ``cfg.task`` names; returns its test metrics."""
    if cfg.task == "caption":
        from captioner.training.loop import train

        return train(cfg)
    if cfg.task == "vqa":
        from captioner.training.vqa import train_vqa

        return train_vqa(cfg)
    raise ConfigError(f"task={cfg.task!r} is not a task; expected caption or vqa")
