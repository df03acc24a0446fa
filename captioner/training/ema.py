"""An exponential moving average of the trainable weights (Polyak averaging), used for validation and test.

Averaging the weights of the last few hundred steps smooths out the noise of the final updates; it is
a cheap, standard gain for sequence models. Only trainable parameters are averaged; buffers (BatchNorm
statistics of a fine-tuned encoder) are used as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``shadow <- d * shadow + (1 - d) * weight`` after every optimizer step, d = min(decay, (1 + n) / (10 + n)).

    The warm-up of d (n = updates so far) keeps the first, random weights from dominating a short run.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema must be in (0, 1) (0 disables it), got {decay}")
        self.decay = decay
        self.updates = 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]  # the model's own tensors: updated in place by the optimizer
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the current weights (call after every optimizer step)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the training weights come back after."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"weight average lacks {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(state["shadow"][n])
