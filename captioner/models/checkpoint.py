"""Checkpoints: plain tensors and Python values only, written atomically, read with ``weights_only=True``.

Beside the model (not in ``training/``): captioning, evaluation and notebooks read checkpoints without the training job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from captioner.data.vocab import Vocabulary
from captioner.models.captioner import Captioner, spec_from_dict
from captioner.utils import atomic_torch_save

FORMAT_VERSION = 1
REQUIRED = ("format_version", "model_config", "vocab", "model")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or from an incompatible version; the message names the file."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | Path, model: Captioner, vocab: Vocabulary, **extra: Any) -> None:
    """Write a checkpoint: model config and weights, vocabulary, plus ``extra`` (optimizer, epoch, RNG, metrics...)."""
    m = unwrap(model)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model_config": m.spec.to_dict(),
        "vocab": list(vocab.words),
        "model": m.state_dict(),
        **extra,
    }
    atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, zip errors, truncated files, disallowed globals
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable captioner checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path}: not a captioner checkpoint (missing {', '.join(missing)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is not supported (this version reads {FORMAT_VERSION})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> tuple[Captioner, Vocabulary]:
    """Rebuild the model and vocabulary stored in a loaded checkpoint."""
    try:
        vocab = Vocabulary(ckpt["vocab"])
        model = Captioner(spec_from_dict(ckpt["model_config"]), encoder_weights=False)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint does not match this version of captioner ({first[:300]})") from None
    return model, vocab


def load_captioner(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Captioner, Vocabulary]:
    """A ready-to-use model (eval mode) and vocabulary from a checkpoint file."""
    model, vocab = model_from_checkpoint(load_checkpoint(path, map_location), path)
    return model.eval(), vocab
