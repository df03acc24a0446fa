"""Decoding strategies built on the decoder's single ``step()``; each returns :class:`Caption` objects.

``decode`` gives one caption per image (what validation, evaluation and the captioner use);
``decode_nbest`` gives a ranked list per image (beam search's n best, or several samples).
Every strategy applies the same word masks (:mod:`captioner.decoding.constraints`): ``<unk>`` is
suppressed unless ``cfg.allow_unk``, and ``cfg.block_bad_endings`` keeps captions from ending on
"a", "the", "of", ...
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from captioner.data.vocab import Vocabulary
from captioner.decoding.beam import LENGTH_PENALTIES, beam_search, length_penalties
from captioner.decoding.caption import Caption
from captioner.decoding.constraints import BAD_ENDINGS, DecodeMask, bad_ending_rate
from captioner.decoding.greedy import greedy_decode
from captioner.decoding.sample import sample_decode
from captioner.models.decoder import AttentionDecoder

__all__ = [
    "BAD_ENDINGS", "LENGTH_PENALTIES", "STRATEGIES", "Caption", "DecodeMask", "bad_ending_rate", "beam_search", "decode",
    "decode_nbest", "greedy_decode", "length_penalties", "sample_decode",
]

STRATEGIES = ("greedy", "sample", "beam")


def decode(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, cfg: Any) -> list[Caption]:
    """One caption per image for features (B, L, D), by the strategy named in ``cfg`` (a DecodeConfig)."""
    if cfg.strategy == "beam":  # only the best is wanted: n_best=1 also lets images stop sooner
        return [nbest[0] for nbest in _beam(decoder, features, vocab, cfg, n_best=1)]
    if cfg.strategy == "sample":
        return _sample(decoder, features, vocab, cfg)
    if cfg.strategy == "greedy":
        return greedy_decode(decoder, features, vocab, max_len=cfg.max_len, attend=cfg.hard_attend, **_masks(cfg))
    raise ValueError(f"unknown decoding strategy {cfg.strategy!r}; available: {', '.join(STRATEGIES)}")


def decode_nbest(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, cfg: Any) -> list[list[Caption]]:
    """Up to ``cfg.n_best`` captions per image, best first.

    beam: the n best finished hypotheses (topped up with unfinished ones if too few finished);
    sample: ``n_best`` independent samples (seeded), sorted by score; greedy: its single caption.
    """
    if cfg.strategy == "beam":
        return _beam(decoder, features, vocab, cfg, n_best=cfg.n_best)
    if cfg.strategy == "sample":
        if cfg.n_best < 1:
            raise ValueError(f"n_best must be >= 1, got {cfg.n_best}")
        B = features.size(0)
        flat = _sample(decoder, features.repeat_interleave(cfg.n_best, dim=0), vocab, cfg)  # (B*n_best) captions
        groups = [flat[b * cfg.n_best : (b + 1) * cfg.n_best] for b in range(B)]
        return [sorted(g, key=lambda c: c.score, reverse=True) for g in groups]
    return [[c] for c in decode(decoder, features, vocab, cfg)]


def _beam(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, cfg: Any, n_best: int) -> list[list[Caption]]:
    return beam_search(
        decoder, features, vocab, beam_size=cfg.beam_size, max_len=cfg.max_len, length_penalty=cfg.length_penalty,
        alpha=cfg.alpha, no_repeat_ngram=cfg.no_repeat_ngram, n_best=n_best, attend=cfg.hard_attend, **_masks(cfg),
    )


def _sample(decoder: AttentionDecoder, features: Tensor, vocab: Vocabulary, cfg: Any) -> list[Caption]:
    return sample_decode(
        decoder, features, vocab, max_len=cfg.max_len, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, seed=cfg.seed, attend=cfg.hard_attend, **_masks(cfg),
    )


def _masks(cfg: Any) -> dict[str, bool]:
    """The word-mask switches of a DecodeConfig (defaults for configs that predate them)."""
    return {"allow_unk": bool(getattr(cfg, "allow_unk", False)), "block_bad_endings": bool(getattr(cfg, "block_bad_endings", False))}
