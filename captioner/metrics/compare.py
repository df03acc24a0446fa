"""Paired bootstrap comparison of two systems' captions for the same images.

How much of a difference between two test figures is the test split's own noise? Resample the
images with replacement (the same draw for both systems), score each resampled corpus, and read the
spread of the difference (Koehn 2004, for machine translation; every caption metric here is a
function of per-image quantities, so a resample costs one matrix product, not a re-scoring):

- BLEU-n pools clipped matches, n-gram totals and lengths over images: a resample pools them with
  the draw's counts as weights (:func:`captioner.metrics.bleu.bleu_from_totals`).
- CIDEr-D, ROUGE-L and METEOR are means of per-image scores: a resample is a weighted mean. CIDEr-D's
  document frequencies stay those of the whole evaluated set (a duplicated image does not count twice
  as a document), as in the bootstrap of any mean of fixed per-image scores.

The point estimates are the two corpora's scores, equal to :func:`captioner.metrics.evaluate`'s.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from captioner.data.tokenize import tokenize
from captioner.metrics import _check_inputs as check_inputs
from captioner.metrics.bleu import bleu_from_totals, bleu_statistics
from captioner.metrics.cider import cider_d_scores
from captioner.metrics.meteor import meteor_scores
from captioner.metrics.ngrams import CorpusNgrams, Tokens
from captioner.metrics.rouge import rouge_l_scores


@dataclass(frozen=True)
class Difference:
    """One metric of system A against system B on the same images."""

    a: float  # A's score on the whole set
    b: float  # B's score on the whole set
    diff: float  # a - b
    low: float  # the interval of the resampled differences (percentiles), at the level asked for
    high: float
    se: float  # standard deviation of the resampled differences (the bootstrap standard error of diff)
    a_better: float  # share of resamples in which A scores higher than B
    a_se: float  # the bootstrap standard error of A's score alone (of B's: b_se), from the same resamples
    b_se: float


def resample_counts(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, num_images) how often each image is drawn in each bootstrap resample (rows sum to num_images)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(resamples, num_images))  # (R, I) image indices
    counts = np.zeros((resamples, num_images))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts


def weighted_scores(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens], weights: np.ndarray,
                   meteor: bool) -> dict[str, np.ndarray]:
    """Each metric of one system on weighted corpora: weights (W, I), image i counted weights[w, i] times -> {metric: (W,)}.

    A row of ones is the whole set; a row of bootstrap counts, the corpus of the drawn images (duplicates included).
    """
    ngrams = CorpusNgrams.build(references, hypotheses)
    stats = bleu_statistics(references, hypotheses, ngrams=ngrams)
    bleu = bleu_from_totals(weights @ stats.correct, weights @ stats.guess, weights @ stats.hyp_len,
                            weights @ stats.ref_len)  # (W, 4)
    per_image = {"CIDEr-D": np.asarray(cider_d_scores(references, hypotheses, ngrams=ngrams)[1]),
                 "ROUGE-L": np.asarray(rouge_l_scores(references, hypotheses)[1])}
    if meteor:
        per_image["METEOR"] = np.asarray(meteor_scores(references, hypotheses)[1])
    total = weights.sum(axis=1)  # (W,)
    scores = {f"BLEU-{n + 1}": bleu[:, n] for n in range(bleu.shape[1])}
    scores.update({name: (weights @ values) / total for name, values in per_image.items()})
    return scores


def paired_bootstrap(
    references: Mapping[Hashable, Sequence[str]],
    hypotheses_a: Mapping[Hashable, str],
    hypotheses_b: Mapping[Hashable, str],
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    meteor: bool = False,
) -> dict[str, Difference]:
    """Every COCO metric of A against B (raw strings keyed by image id, the same images), with bootstrap intervals."""
    if set(hypotheses_a) != set(hypotheses_b):
        only_a, only_b = set(hypotheses_a) - set(hypotheses_b), set(hypotheses_b) - set(hypotheses_a)
        raise ValueError(f"the two systems caption different images: {len(only_a)} only in the first, "
                         f"{len(only_b)} only in the second (e.g. {sorted(map(str, only_a or only_b))[0]!r})")
    check_inputs(references, hypotheses_a)  # the metrics' own checks: references for every id, raw strings
    check_inputs(references, hypotheses_b)
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1); got {resamples}, {level}")
    ids = list(hypotheses_a)
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    # Row 0 weighs every image once (the whole set); rows 1.. are the resamples, the same draw for both systems.
    weights = np.concatenate([np.ones((1, len(ids))), resample_counts(len(ids), resamples, seed)])  # (1 + R, I)
    a = weighted_scores(refs, [tokenize(hypotheses_a[i]) for i in ids], weights, meteor)
    b = weighted_scores(refs, [tokenize(hypotheses_b[i]) for i in ids], weights, meteor)
    tail = 100 * (1 - level) / 2
    out = {}
    for name in a:
        d = a[name][1:] - b[name][1:]  # (R,)
        low, high = np.percentile(d, [tail, 100 - tail])
        out[name] = Difference(float(a[name][0]), float(b[name][0]), float(a[name][0] - b[name][0]), float(low),
                               float(high), float(d.std()), float((d > 0).mean()), float(a[name][1:].std()),
                               float(b[name][1:].std()))
    return out
