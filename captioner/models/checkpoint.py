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


# Models that ship inside the package (captioner/assets/<name>.pt), usable wherever a checkpoint path is.
BUNDLED = {"flickr8k": "flickr8k.pt"}
DEFAULT_MODEL = "flickr8k"


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A checkpoint file: an existing path as given, else the bundled model of that name (``flickr8k``)."""
    path = Path(path_or_name)
    if path.is_file() or str(path_or_name) not in BUNDLED:
        return path
    from importlib.resources import files

    bundled = Path(str(files("captioner.assets").joinpath(BUNDLED[str(path_or_name)])))
    if not bundled.is_file():
        raise CheckpointError(f"{path_or_name}: the bundled model is not in this installation ({bundled} is missing); "
                              "reinstall captioner from its repository or wheel, or pass a checkpoint file")
    return bundled


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint (a path, or a bundled model's name) without unpickling arbitrary objects."""
    path = resolve_checkpoint(path)
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
    """Rebuild the model and vocabulary stored in a loaded checkpoint.

    A compact checkpoint (``export_compact``) stores no encoder weights: the encoder is built from its
    own source (e.g. the EfficientNet-Lite0 PyPI package) and must match the stored fingerprint.
    """
    compact = ckpt.get("encoder_sha256") is not None
    try:
        vocab = Vocabulary(ckpt["vocab"])
        model = Captioner(spec_from_dict(ckpt["model_config"]), encoder_weights=compact)
        if compact:
            check_encoder_fingerprint(model, ckpt["encoder_sha256"], path)
            dtypes = {k: v.dtype for k, v in model.decoder.state_dict().items()}
            state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in ckpt["model"].items()}
            model.decoder.load_state_dict(state)
        else:
            model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint does not match this version of captioner ({first[:300]})") from None
    return model, vocab


def check_encoder_fingerprint(model: Captioner, expected: str, path: str | Path) -> None:
    """Refuse an encoder whose weights are not the ones the compact checkpoint's decoder was trained on."""
    from captioner.models.encoder import state_fingerprint

    found = state_fingerprint(model.encoder.body)
    if found != expected:
        raise CheckpointError(f"{path}: the encoder weights found ({model.spec.encoder.get('name')}, sha256 {found[:12]}...) "
                              f"are not the ones this model was trained with (sha256 {expected[:12]}...); install the "
                              "weights package version it was made with")


def export_compact(ckpt_path: str | Path, out: str | Path, dtype: torch.dtype = torch.float16, **meta: Any) -> dict[str, Any]:
    """Write a small caption-only copy of a checkpoint: the decoder in ``dtype``, the encoder by fingerprint only.

    The frozen encoder's weights come from their own package when the copy is loaded (never stored
    twice); the SHA-256 of those weights is stored and checked. ``meta`` (e.g. the command that trained
    it and its test figures) is kept under ``"metrics"``. Returns what was written.
    """
    from captioner.models.encoder import state_fingerprint

    ckpt = load_checkpoint(ckpt_path)
    model, _ = model_from_checkpoint(ckpt, ckpt_path)
    if not model.encoder.frozen:
        raise CheckpointError(f"{ckpt_path}: a compact copy needs a frozen encoder (this one was fine-tuned)")
    small = {
        "format_version": FORMAT_VERSION,
        "model_config": ckpt["model_config"],
        "vocab": ckpt["vocab"],
        "model": {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.decoder.state_dict().items()},
        "encoder_sha256": state_fingerprint(model.encoder.body),
        "metrics": meta or ckpt.get("metrics"),
    }
    atomic_torch_save(small, out)
    return small


def load_captioner(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Captioner, Vocabulary]:
    """A ready-to-use model (eval mode) and vocabulary from a checkpoint file or a bundled model's name."""
    model, vocab = model_from_checkpoint(load_checkpoint(path, map_location), path)
    return model.eval(), vocab
