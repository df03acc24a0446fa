"""Where a training run is, and what it needs to stop cleanly and resume exactly: progress, RNG states, signals."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training is: the epoch in progress, batches done in it, and its running loss sums."""

    epoch: int
    batch: int = 0
    totals: dict[str, float] | None = None
    global_step: int = 0
    stage: str = "xe"  # xe (cross-entropy) | scst


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states (plain values, safe for weights_only loading)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, inner, gauss = state["python"]
    random.setstate((v, tuple(inner), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; the message says how to resume."""


class StopFlag:
    """Turns SIGTERM / SIGINT into a flag checked between steps, so the current step finishes cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == 2:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %d: finishing the current step, then writing a checkpoint", signum)

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
