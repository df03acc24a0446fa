"""Captioner = encoder + decoder, built from plain config values; checkpoints hold everything needed to caption."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captioner.data.images import normalise_uint8
from captioner.models.decoder import AttentionDecoder, DecoderOutput
from captioner.models.encoder import Encoder, encoder_spec


@dataclass
class CaptionerSpec:
    """Everything needed to rebuild a model: stored as a plain dict in every checkpoint."""

    encoder: dict[str, Any]
    decoder: dict[str, Any]
    vocab_size: int
    image_size: int
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class Captioner(nn.Module):
    """Image -> features -> attention decoder. ``encoder`` may be skipped when features come from a cache."""

    def __init__(self, spec: CaptionerSpec, encoder_weights: bool = True):
        super().__init__()
        enc = dict(spec.encoder)
        if not encoder_weights:
            enc["weights"] = None  # weights will come from a checkpoint's state dict
        self.spec = spec
        self.encoder = Encoder(**enc)
        self.spec.mean, self.spec.std = self.encoder.mean, self.encoder.std
        self.decoder = AttentionDecoder(vocab_size=spec.vocab_size, feature_dim=self.encoder.out_dim, **spec.decoder)

    def encode(self, x: Tensor) -> Tensor:
        """Images -> features (B, L, D). The one place that tells inputs apart:

        uint8 images (B, 3, H, W) are normalised with the encoder's mean/std, float images (B, 3, H, W)
        are taken as normalised already, and cached features (B, L, D) pass through.
        """
        if x.dim() == 3:  # (B, L, D) features from a cache
            return x.to(torch.get_default_dtype())
        if x.dtype == torch.uint8:
            x = normalise_uint8(x, self.spec.mean, self.spec.std)  # (B, 3, H, W)
        return self.encoder(x)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor | None = None, image_of: Tensor | None = None,
                attend: str | None = None) -> DecoderOutput:
        """Teacher-forced decoder outputs for images (B, 3, H, W) and captions (N, T).

        ``image_of`` (N,) says which image each caption belongs to (default: caption i <-> image i).
        """
        features = self.encode(images)  # (B, L, D), expanded to captions inside the decoder after projection
        return self.decoder(features, captions, lengths, attend=attend, image_of=image_of)


def build_model(encoder_cfg: Any, model_cfg: Any, vocab_size: int, image_size: int) -> Captioner:
    """Build from the ``encoder`` and ``model`` config groups (dataclasses or dicts).

    Every ``model`` field but its option name is a decoder argument (``ModelConfig`` describes only the
    network); the encoder keeps only the options its backbone takes (``encoder_spec``).
    """
    dec = dict(model_cfg if isinstance(model_cfg, dict) else asdict(model_cfg))
    dec.pop("name", None)
    spec = CaptionerSpec(encoder=encoder_spec(encoder_cfg), decoder=dec, vocab_size=vocab_size, image_size=image_size)
    return Captioner(spec)


def spec_from_dict(d: dict[str, Any]) -> CaptionerSpec:
    """Inverse of :meth:`CaptionerSpec.to_dict`."""
    return CaptionerSpec(
        encoder=dict(d["encoder"]), decoder=dict(d["decoder"]), vocab_size=int(d["vocab_size"]),
        image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
    )
