"""METEOR 1.5 through pycocoevalcap's wrapper of the Java jar (an optional extra).

Unlike BLEU, CIDEr-D and ROUGE-L this is not re-implemented: METEOR needs WordNet
synonyms, a stemmer and a paraphrase table, which pycocoevalcap ships with its jar.
It needs ``pip install pycocoevalcap`` (the ``meteor`` extra) and ``java`` on PATH;
the jar asks for a 2 GB heap and takes tens of seconds to load its paraphrase table.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from captioner.metrics.ngrams import Tokens


def meteor_available() -> bool:
    """Whether METEOR can run here: pycocoevalcap importable and ``java`` on PATH."""
    try:
        from pycocoevalcap.meteor.meteor import Meteor  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def meteor_scores(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens]) -> tuple[float, list[float]]:
    """METEOR of tokenised hypotheses against their references: (corpus score, per-image scores)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError as err:
        raise ImportError("METEOR needs pycocoevalcap: pip install 'captioner[meteor]' (and Java)") from err
    if shutil.which("java") is None:
        raise RuntimeError("METEOR needs a Java runtime: 'java' was not found on PATH")
    # The wrapper takes {id: [space-joined sentence]}, like the COCO pipeline after PTB tokenisation.
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(hyp)] for i, hyp in enumerate(hypotheses)}
    scorer = Meteor()
    try:
        corpus, per_image = scorer.compute_score(gts, res)
    except ValueError as err:  # float(b"") when the Java process died or printed nothing
        raise RuntimeError("METEOR's Java process returned no score (it asks for a 2 GB heap)") from err
    finally:
        # The wrapper only stops its Java process in __del__; stop it now rather than at GC.
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(corpus), [float(s) for s in per_image]
