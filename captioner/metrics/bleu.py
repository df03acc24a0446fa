"""BLEU-1..4 with the COCO caption evaluation's rules (pycocoevalcap ``Bleu(4)``).

The rules, which differ from other BLEU implementations (sacrebleu, nltk):
- n-gram counts are clipped per image by the largest count in any single reference;
- the effective reference length of an image is the reference length closest to the
  hypothesis length, ties going to the shorter reference;
- the corpus score pools clipped matches, n-gram totals and lengths over all images
  before the geometric mean and the brevity penalty (it is not a mean of image scores);
- every precision is ``(matches + 1e-15) / (total + 1e-9)`` and the length ratio is
  ``(hyp_len + 1e-15) / (ref_len + 1e-9)``. These constants are why an image whose
  hypothesis is shorter than n words gets a tiny non-zero BLEU-n instead of 0 or an error,
  and why an order with no match over the whole corpus gives about 1e-15 ** (1/n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from captioner.metrics.ngrams import CorpusNgrams, Tokens, lookup

_TINY = 1e-15  # added to match counts and to the hypothesis length
_SMALL = 1e-9  # added to n-gram totals and to the reference length


def _bleu_from_stats(correct: Sequence[float], guess: Sequence[float], hyp_len: float, ref_len: float) -> list[float]:
    """Corpus BLEU-1..n from pooled match counts, n-gram totals and lengths, with pycocoevalcap's smoothing."""
    scores = []
    product = 1.0
    for k, (c, g) in enumerate(zip(correct, guess)):
        product *= (c + _TINY) / (g + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


def _closest_ref_len(ngrams: CorpusNgrams) -> np.ndarray:
    """(I,) per image, the reference length nearest to the hypothesis length; ties go to the shorter."""
    diff = np.abs(ngrams.ref_len - ngrams.hyp_len[ngrams.ref_image])
    # Minimising (diff, length) lexicographically as one integer: diff * M + length.
    m = int(ngrams.ref_len.max(initial=0)) + 1
    best = np.minimum.reduceat(diff * m + ngrams.ref_len, ngrams.ref_starts)
    return best % m


@dataclass(frozen=True)
class BleuStatistics:
    """What corpus BLEU pools, per image: clipped matches, hypothesis n-grams and the two lengths.

    Any weighted sum of these over images (all ones: the corpus; bootstrap counts: a resampled corpus)
    gives that corpus's BLEU through :func:`bleu_from_totals`.
    """

    correct: np.ndarray  # (I, max_n) clipped n-gram matches
    guess: np.ndarray  # (I, max_n) hypothesis n-grams
    hyp_len: np.ndarray  # (I,) hypothesis length
    ref_len: np.ndarray  # (I,) effective reference length (the closest one)


def bleu_statistics(
    references: Sequence[Sequence[Tokens]],
    hypotheses: Sequence[Tokens],
    max_n: int = 4,
    ngrams: Optional[CorpusNgrams] = None,
) -> BleuStatistics:
    """Per-image BLEU statistics of tokenised hypotheses (COCO clipping and reference-length rules)."""
    if ngrams is None:
        ngrams = CorpusNgrams.build(references, hypotheses, max_n)
    num_images = ngrams.num_images
    correct = np.zeros((num_images, max_n))  # clipped matches per image and order
    for k in range(max_n):
        hyp, ref_max = ngrams.hyp[k], ngrams.ref_max[k]
        # Clip each hypothesis n-gram count by its largest count in any single reference.
        best = lookup(ref_max.key, ref_max.max_count, ngrams.hyp_keys(k))
        correct[:, k] = np.bincount(hyp.sentence, weights=np.minimum(hyp.count, best), minlength=num_images)
    hyp_len = ngrams.hyp_len
    guess = np.maximum(hyp_len[:, None] - np.arange(max_n), 0).astype(np.float64)  # (I, max_n) hypothesis n-grams
    return BleuStatistics(correct, guess, hyp_len.astype(np.float64), _closest_ref_len(ngrams).astype(np.float64))


def bleu_from_totals(correct: np.ndarray, guess: np.ndarray, hyp_len: np.ndarray, ref_len: np.ndarray) -> np.ndarray:
    """BLEU-1..n of pooled statistics, vectorised over leading dimensions: (..., n), (..., n), (...), (...) -> (..., n).

    The same formula and smoothing as :func:`_bleu_from_stats` (one corpus, Python floats) and as the
    per-image scores of :func:`bleu_scores`.
    """
    scores = np.cumprod((correct + _TINY) / (guess + _SMALL), axis=-1) ** (1.0 / np.arange(1, correct.shape[-1] + 1))
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    penalty = np.exp(1 - 1 / ratio, where=ratio < 1, out=np.ones_like(ratio))
    return scores * penalty[..., None]


def bleu_scores(
    references: Sequence[Sequence[Tokens]],
    hypotheses: Sequence[Tokens],
    max_n: int = 4,
    ngrams: Optional[CorpusNgrams] = None,
) -> tuple[list[float], list[list[float]]]:
    """COCO BLEU-1..max_n of tokenised hypotheses: (corpus scores, per-image scores [image][n-1]).

    ``ngrams`` may hold ``CorpusNgrams.build(references, hypotheses, max_n)`` to share it with CIDEr-D.
    """
    stats = bleu_statistics(references, hypotheses, max_n, ngrams)
    # Per image, the same float operations as pycocoevalcap: a running product of precisions.
    per_image = bleu_from_totals(stats.correct, stats.guess, stats.hyp_len, stats.ref_len)
    totals = stats.correct.sum(axis=0).tolist(), stats.guess.sum(axis=0).tolist()  # integers, exact in float64
    corpus = _bleu_from_stats(*totals, int(stats.hyp_len.sum()), int(stats.ref_len.sum()))
    return corpus, per_image.tolist()
