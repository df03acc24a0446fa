"""Paired bootstrap comparison of two systems' captions (captioner.metrics.compare, evaluate.py compare=).

References: the corpus metrics of captioner.metrics (pycocoevalcap-exact), the corpus of the drawn images built
explicitly, and the analytic standard error of a mean of paired differences.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from captioner.data.tokenize import tokenize
from captioner.metrics import bleu_scores, evaluate
from captioner.metrics.compare import paired_bootstrap, resample_counts, weighted_scores

WORDS = "a the dog cat man woman runs sits on in grass water red blue ball field plays with".split()


def _corpus(n: int, seed: int) -> tuple[dict, dict, dict]:
    """n images with 5 references each, and two systems: B shares fewer words with the references than A."""
    rng = random.Random(seed)
    refs, a, b = {}, {}, {}
    for i in range(n):
        theme = rng.sample(WORDS, 6)
        refs[f"img{i}"] = [" ".join(rng.choice(theme) for _ in range(rng.randint(5, 11))) for _ in range(5)]
        a[f"img{i}"] = " ".join(rng.choice(theme) for _ in range(rng.randint(4, 10)))
        b[f"img{i}"] = " ".join(rng.choice(theme if rng.random() < 0.6 else WORDS) for _ in range(rng.randint(3, 12)))
    return refs, a, b


def test_point_estimates_are_the_corpus_metrics():
    refs, a, b = _corpus(60, seed=0)
    diffs = paired_bootstrap(refs, a, b, resamples=50)
    ma, mb = evaluate(refs, a), evaluate(refs, b)
    assert set(diffs) == set(ma)  # BLEU-1..4, CIDEr-D, ROUGE-L
    for name, d in diffs.items():
        assert d.a == pytest.approx(ma[name], rel=1e-12) and d.b == pytest.approx(mb[name], rel=1e-12), name
        assert d.diff == pytest.approx(ma[name] - mb[name], rel=1e-9, abs=1e-15)


def test_a_resample_scores_the_corpus_of_the_drawn_images():
    refs, a, _ = _corpus(40, seed=1)
    ids = list(a)
    ref_toks = [[tokenize(r) for r in refs[i]] for i in ids]
    hyp_toks = [tokenize(a[i]) for i in ids]
    counts = resample_counts(len(ids), resamples=3, seed=5)
    assert (counts.sum(axis=1) == len(ids)).all() and (counts == 0).any()  # a draw repeats some images, leaves others
    scores = weighted_scores(ref_toks, hyp_toks, counts, meteor=False)
    per_image = evaluate(refs, a, per_image=True)["per_image"]
    per_image_cider = np.array([per_image[i]["CIDEr-D"] for i in ids])
    for r, row in enumerate(counts):
        drawn = [i for i, c in enumerate(row) for _ in range(int(c))]  # the resampled corpus, duplicates included
        bleu, _ = bleu_scores([ref_toks[i] for i in drawn], [hyp_toks[i] for i in drawn])
        assert [scores[f"BLEU-{n}"][r] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12)
        # CIDEr-D: the drawn images' scores, with the document frequencies of the whole set
        assert scores["CIDEr-D"][r] == pytest.approx(per_image_cider[drawn].mean(), rel=1e-12)


def test_identical_systems_differ_by_exactly_nothing():
    refs, a, _ = _corpus(30, seed=2)
    for d in paired_bootstrap(refs, a, dict(a), resamples=200).values():
        assert d.diff == d.low == d.high == d.se == d.a_better == 0.0


def test_a_system_better_on_every_image_wins_every_resample():
    refs, a, _ = _corpus(50, seed=3)
    worse = {i: "zebra" for i in a}  # a word no reference has: every image scores 0 on every metric
    d = paired_bootstrap(refs, a, worse, resamples=300)["CIDEr-D"]
    assert d.low > 0 and d.a_better == 1.0 and d.b == 0.0
    # B scores 0 in every resample, so the difference's spread is A's own
    assert d.b_se == 0.0 and d.a_se == pytest.approx(d.se, rel=1e-12) and d.a_se > 0


def test_the_standard_error_of_a_mean_metric_is_the_analytic_one():
    # For a mean of per-image scores the bootstrap s.e. of the paired difference tends to sd(d) / sqrt(n)
    # (population sd); with 4,000 resamples its Monte-Carlo error is about 1%.
    refs, a, b = _corpus(300, seed=4)
    diffs = paired_bootstrap(refs, a, b, resamples=4000, seed=1)
    pa, pb = evaluate(refs, a, per_image=True)["per_image"], evaluate(refs, b, per_image=True)["per_image"]
    for name in ("CIDEr-D", "ROUGE-L"):
        d = np.array([pa[i][name] - pb[i][name] for i in a])
        assert diffs[name].se == pytest.approx(d.std() / np.sqrt(len(d)), rel=0.06), name
        assert diffs[name].low < diffs[name].diff < diffs[name].high
        own = np.array([pa[i][name] for i in a])
        assert diffs[name].a_se == pytest.approx(own.std() / np.sqrt(len(own)), rel=0.06), name


def test_systems_must_caption_the_same_images():
    refs, a, b = _corpus(10, seed=5)
    del b["img3"]
    with pytest.raises(ValueError, match="different images: 1 only in the first, 0 only in the second \\(e.g. 'img3'\\)"):
        paired_bootstrap(refs, a, b)
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        paired_bootstrap(refs, a, dict(a), resamples=0)


def test_evaluate_job_compare_reports_the_difference_and_refuses_other_images(tiny_shapes, tmp_path):
    from test_evaluate import compose_evaluate

    from captioner.data.build import build_data
    from captioner.data.sources import DatasetError
    from captioner.evaluation import evaluate_job

    cfg = compose_evaluate([f"data.root={tiny_shapes}", "data.generate=false", f"output_dir={tmp_path}", "split=val",
                            "bootstrap=100"])
    records = build_data(cfg.data).records["val"]
    good = [{"image_id": r.image_id, "caption": r.captions[0]} for r in records]
    poor = [{"image_id": r.image_id, "caption": "a"} for r in records]
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "poor.json").write_text(json.dumps(poor))
    cfg.results, cfg.compare = str(tmp_path / "good.json"), str(tmp_path / "poor.json")
    m = evaluate_job(cfg)
    assert m["compare/CIDEr-D/this"] == m["CIDEr-D"] and m["compare/CIDEr-D/diff"] > 0
    assert m["compare/CIDEr-D/other"] == pytest.approx(evaluate({r.image_id: r.captions for r in records},
                                                                {c["image_id"]: c["caption"] for c in poor})["CIDEr-D"])
    assert json.loads((tmp_path / "metrics.json").read_text())["compare/BLEU-4/p_better"] == m["compare/BLEU-4/p_better"]
    (tmp_path / "fewer.json").write_text(json.dumps(poor[1:]))
    cfg.compare = str(tmp_path / "fewer.json")
    with pytest.raises(DatasetError, match="fewer.json: captions 7 images, this evaluation 8"):
        evaluate_job(cfg)
