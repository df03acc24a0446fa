"""Decoding strategies built on the decoder's single ``step()``; each returns :class:`Caption` objects."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from captioner.data.vocab import Vocabulary
from captioner.decoding.caption import Caption
from captioner.decoding.greedy import greedy_decode
from captioner.models.decoder import AttentionDecoder

__all__ = ["Caption", "decode", "greedy_decode"]


def decode(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, cfg: Any) -> list[Caption]:
    """Decode features (B, L, D) with the strategy named by ``cfg.strategy`` (a DecodeConfig)."""
    if cfg.strategy == "greedy":
        return greedy_decode(decoder, features, vocab, max_len=cfg.max_len, attend=cfg.hard_attend)
    raise ValueError(f"unknown decoding strategy {cfg.strategy!r}; available: greedy")
