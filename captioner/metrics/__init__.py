"""Caption metrics with the COCO caption evaluation's exact rules (pycocoevalcap).

``evaluate`` takes raw strings and tokenises them with ``captioner.data.tokenize.tokenize``
(the COCO PTB tokenisation); the token-level functions take already-tokenised lists:

- :func:`bleu_scores` (BLEU-1..4), :func:`cider_d_scores`, :func:`rouge_l_scores`: our own code
  (numpy n-gram tables, bit-parallel LCS), equal to pycocoevalcap's to 1e-9 corpus-level and per
  image, and several times faster;
- :func:`meteor_scores`: pycocoevalcap's METEOR 1.5 jar (needs pycocoevalcap and Java).

SPICE is not supported: it needs Stanford CoreNLP models (about 1 GB) downloaded at
run time by pycocoevalcap, and a Java scene-graph parser.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from captioner.data.tokenize import tokenize
from captioner.metrics.bleu import bleu_scores
from captioner.metrics.cider import cider_d_scores
from captioner.metrics.meteor import meteor_available, meteor_scores
from captioner.metrics.ngrams import CorpusNgrams
from captioner.metrics.rouge import lcs_length, rouge_l_scores

__all__ = ["METRIC_NAMES", "CorpusNgrams", "bleu_scores", "cider_d_scores", "evaluate", "lcs_length",
           "meteor_available", "meteor_scores", "rouge_l_scores", "score_tokens"]

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L")


def score_tokens(
    references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]], with_meteor: bool = False
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """All metrics of tokenised hypotheses, aligned with their references: (corpus, per image)."""
    ngrams = CorpusNgrams.build(references, hypotheses)  # counted once for BLEU and CIDEr-D
    bleu_corpus, bleu_images = bleu_scores(references, hypotheses, ngrams=ngrams)
    cider_corpus, cider_images = cider_d_scores(references, hypotheses, ngrams=ngrams)
    rouge_corpus, rouge_images = rouge_l_scores(references, hypotheses)
    corpus = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu_corpus)}
    corpus.update({"CIDEr-D": cider_corpus, "ROUGE-L": rouge_corpus})
    images = [
        {**{f"BLEU-{n + 1}": b for n, b in enumerate(bl)}, "CIDEr-D": c, "ROUGE-L": r}
        for bl, c, r in zip(bleu_images, cider_images, rouge_images)
    ]
    if with_meteor:
        corpus["METEOR"], meteor_images = meteor_scores(references, hypotheses)
        for scores, m in zip(images, meteor_images):
            scores["METEOR"] = m
    return corpus, images


def _check_inputs(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> None:
    """Raise a clear error for input that pycocoevalcap would reject with a bare assert (or mis-score)."""
    if not hypotheses:
        raise ValueError("no hypotheses to evaluate")
    missing = [i for i in hypotheses if i not in references]
    if missing:
        raise ValueError(f"{len(missing)} hypothesis ids have no references, e.g. {missing[:5]!r}")
    for i, hyp in hypotheses.items():
        if not isinstance(hyp, str):
            raise TypeError(f"hypothesis {i!r} must be one raw string, got {type(hyp).__name__}")
        refs = references[i]
        # A bare string would be read as a list of one-character references.
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references of {i!r} must be a list of raw strings")
        if len(refs) == 0:
            raise ValueError(f"image {i!r} has an empty reference list")


def evaluate(
    references: Mapping[Hashable, Sequence[str]],
    hypotheses: Mapping[Hashable, str],
    per_image: bool = False,
    meteor: bool = False,
) -> dict:
    """COCO metrics of raw hypothesis strings against raw reference strings, keyed by image id.

    Returns ``{"BLEU-1".."BLEU-4", "CIDEr-D", "ROUGE-L"}`` (BLEU and ROUGE-L on a 0-1 scale,
    CIDEr-D on its own scale, 10x the mean cosine similarity), plus ``"METEOR"`` when
    ``meteor=True`` (needs pycocoevalcap and Java), plus ``"per_image": {id: same keys}``
    when ``per_image=True``. Only the images with a hypothesis are scored; references of
    other ids are ignored, so CIDEr-D's document frequencies come from the evaluated set.
    SPICE is not supported (it needs a ~1 GB download of Stanford models).
    """
    _check_inputs(references, hypotheses)
    if meteor and not meteor_available():
        raise RuntimeError("METEOR needs pycocoevalcap (pip install 'captioner[meteor]') and 'java' on PATH")
    ids = list(hypotheses)
    ref_tokens = [[tokenize(r) for r in references[i]] for i in ids]
    hyp_tokens = [tokenize(hypotheses[i]) for i in ids]
    corpus, images = score_tokens(ref_tokens, hyp_tokens, with_meteor=meteor)
    result: dict = dict(corpus)
    if per_image:
        result["per_image"] = dict(zip(ids, images))
    return result
