"""Small pieces every layer uses: picking a device, its precision, and writing files atomically."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from captioner.config import PRECISIONS


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available; an unavailable CUDA device is a ValueError naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return dev


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of a training step: ``auto`` bf16 on CUDA only, ``native`` bf16 where the device
    multiplies bf16 natively (:func:`native_bf16`), ``bf16`` on any device, ``fp32`` none.

    Under bf16 the matrix products run in bfloat16; the decoder keeps its recurrent state, softmaxes and
    log-probabilities in float32 (``captioner.models.decoder``), and weights, gradients and the optimiser
    stay float32. On a CPU it pays only where the CPU has bf16 instructions (AVX512-BF16 or AMX).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device`` (see :func:`autocast`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "native":
        return native_bf16(device)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA device with bf16 support, or a CPU with bf16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 products (oneDNN's check); without them bf16 autocast is slower, not faster."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``.

    A crash (even kill -9) at any moment leaves either the old file or the new one, never half of one;
    an exception inside the block removes the temporary file and leaves ``path`` untouched. Temporary
    files left by a writer killed mid-write are removed first. ``durable`` also fsyncs the directory,
    so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Call ``write(file)`` on a temporary file renamed over ``path`` when it returns."""
    with atomic_open(path, mode) as f:
        write(f)
