"""ROUGE-L with the COCO caption evaluation's rules (pycocoevalcap ``Rouge``).

Per image: for each reference, the longest common subsequence (LCS) of tokens gives
a precision ``lcs / len(hyp)`` and a recall ``lcs / len(ref)``; the best precision and
the best recall are taken *independently* (possibly from different references) and
combined as ``(1 + b**2) p r / (r + b**2 p)`` with ``b = 1.2``, or 0 when either is 0.
The corpus score is the mean of image scores.

pycocoevalcap splits sentences with ``split(" ")``, so an empty sentence is one empty
token: it has length 1 and matches only another empty sentence. That is kept here, so
an empty hypothesis scores 0 against non-empty references and 1 against an empty one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from captioner.metrics.ngrams import Tokens


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel, O(len(a) * len(b) / 64))."""
    if len(a) < len(b):
        a, b = b, a
    # Bit i of masks[token] is set where a[i] == token. Each token of b then updates a
    # bit vector of a's positions with a few big-int operations instead of a row of the
    # dynamic-programming table (Allison & Dix 1986, Hyyro 2004): zero bits count the LCS.
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_single(refs: Sequence[Tokens], hyp: Tokens, beta: float = 1.2) -> float:
    """ROUGE-L of one tokenised hypothesis against its references."""
    if len(refs) == 0:
        raise ValueError("every image needs at least one reference")
    hyp = hyp or [""]  # pycocoevalcap's "".split(" ") == [""]
    best_prec = 0.0
    best_rec = 0.0
    for ref in refs:
        ref = ref or [""]
        lcs = lcs_length(ref, hyp)
        best_prec = max(best_prec, lcs / float(len(hyp)))
        best_rec = max(best_rec, lcs / float(len(ref)))
    if best_prec != 0 and best_rec != 0:
        return ((1 + beta**2) * best_prec * best_rec) / float(best_rec + beta**2 * best_prec)
    return 0.0


def rouge_l_scores(
    references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens], beta: float = 1.2
) -> tuple[float, list[float]]:
    """ROUGE-L of tokenised hypotheses against their references: (corpus score, per-image scores)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    scores = [rouge_l_single(refs, hyp, beta) for refs, hyp in zip(references, hypotheses)]
    return math.fsum(scores) / len(scores), scores
