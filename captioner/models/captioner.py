"""Captioner = encoder + decoder, built from plain config values; checkpoints hold everything needed to caption."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captioner.models.decoder import AttentionDecoder, DecoderOutput
from captioner.models.encoder import Encoder


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


DECODER_KEYS = ("embed_dim", "hidden_dim", "attn_dim", "cell", "num_layers", "dropout", "attention", "beta_gate", "deep_output", "image_input", "context_dim")
ENCODER_KEYS = ("name", "weights", "grid", "freeze", "channels", "blocks", "stage")


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

    def encode(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> features (B, L, D); cached features (B, L, D) pass through."""
        if images.dim() == 3:
            return images.to(torch.get_default_dtype())
        return self.encoder(images)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor | None = None, image_of: Tensor | None = None,
                attend: str | None = None) -> DecoderOutput:
        """Teacher-forced decoder outputs for images (B, 3, H, W) and captions (N, T).

        ``image_of`` (N,) says which image each caption belongs to (default: caption i <-> image i).
        """
        features = self.encode(images)  # (B, L, D), expanded to captions inside the decoder after projection
        return self.decoder(features, captions, lengths, attend=attend, image_of=image_of)


def build_model(encoder_cfg: Any, model_cfg: Any, vocab_size: int, image_size: int) -> Captioner:
    """Build from the ``encoder`` and ``model`` config groups (dataclasses or dicts)."""
    enc = encoder_cfg if isinstance(encoder_cfg, dict) else asdict(encoder_cfg)
    dec = model_cfg if isinstance(model_cfg, dict) else asdict(model_cfg)
    enc = {k: enc[k] for k in ENCODER_KEYS if k in enc}
    if enc.get("name") != "shapes_cnn":
        enc.pop("channels", None)
        enc.pop("blocks", None)
    if enc.get("stage") is None:
        enc.pop("stage", None)
    spec = CaptionerSpec(encoder=enc, decoder={k: dec[k] for k in DECODER_KEYS if k in dec}, vocab_size=vocab_size, image_size=image_size)
    return Captioner(spec)


def spec_from_dict(d: dict[str, Any]) -> CaptionerSpec:
    """Inverse of :meth:`CaptionerSpec.to_dict`."""
    return CaptionerSpec(
        encoder=dict(d["encoder"]), decoder=dict(d["decoder"]), vocab_size=int(d["vocab_size"]),
        image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
    )
