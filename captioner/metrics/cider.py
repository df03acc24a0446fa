"""CIDEr-D with the COCO caption evaluation's rules (pycocoevalcap ``Cider``).

For every sentence and every n in 1..4, a tf-idf vector of its n-grams: term
frequency times ``log(number of images) - log(max(1, df))``, where ``df`` counts
the images of the *evaluated set* whose references contain the n-gram (so the score
of one image depends on the whole set, and a one-image set scores 0). Per image and
reference, per n: the hypothesis weight is clipped at the reference weight
(``min(h, r) * r``), divided by both vector norms (skipped when a norm is 0), and
multiplied by the length penalty ``exp(-delta**2 / (2 * sigma**2))``. The image score is
the mean over n, summed over references, divided by their number, times 10; the corpus
score is the mean of image scores.

One pycocoevalcap detail is kept on purpose: ``delta`` is the difference in the number
of *bigrams* of the two sentences, which equals the difference in words except when a
sentence is empty (0 bigrams, like a one-word sentence). Where no reference has a single
word, every score is 0 (pycocoevalcap fails there on ``max()`` of no document frequencies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

from captioner.metrics.ngrams import CorpusNgrams, Tokens, lookup


def cider_d_scores(
    references: Sequence[Sequence[Tokens]],
    hypotheses: Sequence[Tokens],
    max_n: int = 4,
    sigma: float = 6.0,
    ngrams: Optional[CorpusNgrams] = None,
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised hypotheses against their references: (corpus score, per-image scores).

    ``ngrams`` may hold ``CorpusNgrams.build(references, hypotheses, max_n)`` to share it with BLEU.
    """
    if ngrams is None:
        ngrams = CorpusNgrams.build(references, hypotheses, max_n)
    num_images = ngrams.num_images
    num_refs = len(ngrams.ref_len)
    ref_image = ngrams.ref_image
    log_images = math.log(float(num_images))

    similarity = np.zeros(num_refs)  # per reference: sum over orders of the clipped cosine similarity
    for k in range(max_n):
        hyp, ref, size = ngrams.hyp[k], ngrams.ref[k], ngrams.num_grams[k]
        # Document frequency: the number of images with the n-gram in some reference.
        doc_freq = np.bincount(ngrams.ref_max[k].key // num_images, minlength=size)
        idf = log_images - np.log(np.maximum(doc_freq, 1.0))  # an n-gram in no reference counts as df 1
        hyp_w = hyp.count * idf[hyp.gram]  # tf-idf weights of the hypothesis n-grams
        ref_w = ref.count * idf[ref.gram]
        hyp_norm = np.sqrt(np.bincount(hyp.sentence, weights=hyp_w * hyp_w, minlength=num_images))[ref_image]  # (R,)
        ref_norm = np.sqrt(np.bincount(ref.sentence, weights=ref_w * ref_w, minlength=num_refs))  # (R,)
        # Only n-grams in both sentences contribute; the hypothesis weight is clipped at the reference's.
        hyp_w_at_ref = lookup(ngrams.hyp_keys(k), hyp_w, ngrams.ref_keys(k))
        dot = np.bincount(ref.sentence, weights=np.minimum(hyp_w_at_ref, ref_w) * ref_w, minlength=num_refs)
        dot = dot.astype(np.float64, copy=False)  # bincount of no weights is int
        both = (hyp_norm != 0) & (ref_norm != 0)
        similarity += np.divide(dot, hyp_norm * ref_norm, out=dot.copy(), where=both)

    # pycocoevalcap's length is the number of bigrams, so an empty sentence counts like a one-word one.
    delta = np.maximum(ngrams.hyp_len[ref_image] - 1, 0) - np.maximum(ngrams.ref_len - 1, 0)
    penalty = np.exp(-(delta.astype(np.float64) ** 2) / (2 * sigma**2))
    refs_per_image = np.bincount(ref_image, minlength=num_images)
    per_image = np.bincount(ref_image, weights=similarity * penalty, minlength=num_images)  # (I,) summed over refs
    per_image = per_image / max_n / refs_per_image * 10.0
    return math.fsum(per_image.tolist()) / num_images, per_image.tolist()
