"""Time our BLEU / CIDEr-D / ROUGE-L against pycocoevalcap's on the same tokens, and check the numbers agree.

Synthetic corpus (seeded): N images x 5 references drawn from a fixed Zipf-weighted
vocabulary, hypotheses made by editing one reference so that n-grams of every order
match. Each scorer gets its native input (token lists for ours, space-joined strings for
pycocoevalcap) prepared outside the timed region; each timing is the best of --repeats.

    python benchmarks/metrics.py [--images 5000] [--repeats 3]

The last line printed is a JSON object with the timings and ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from captioner.metrics import bleu_scores, cider_d_scores, rouge_l_scores


def make_corpus(images: int, refs_per_image: int, seed: int) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Seeded synthetic (references, hypotheses) as token lists."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(1000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]  # Zipf-like, as in real captions

    def sentence() -> list[str]:
        return rng.choices(vocab, weights, k=rng.randint(8, 16))

    refs = [[sentence() for _ in range(refs_per_image)] for _ in range(images)]
    hyps = []
    for image_refs in refs:
        hyp = list(rng.choice(image_refs))
        for _ in range(rng.randint(0, 4)):  # substitutions, insertions and deletions
            op = rng.random()
            pos = rng.randrange(len(hyp) + 1)
            if op < 0.4 and pos < len(hyp):
                hyp[pos] = rng.choices(vocab, weights)[0]
            elif op < 0.7:
                hyp.insert(pos, rng.choices(vocab, weights)[0])
            elif hyp and pos < len(hyp):
                del hyp[pos]
        hyps.append(hyp)
    return refs, hyps


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls (the machine is shared), and the last result."""
    best = float("inf")
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def assert_close(ours: list[float], theirs: list[float], what: str, tol: float = 1e-9) -> None:
    """Fail loudly if any score differs by more than ``tol``."""
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    if len(ours) != len(theirs) or worst > tol:
        raise AssertionError(f"{what}: scores differ (max abs difference {worst:.3g})")


def main() -> None:
    """Run the benchmark and print the figures, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, hyps = make_corpus(args.images, args.refs, args.seed)
    gts = {i: [" ".join(r) for r in image_refs] for i, image_refs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}

    runs = {
        "bleu": (lambda: bleu_scores(refs, hyps), lambda: Bleu(4).compute_score(gts, res, verbose=0)),
        "cider_d": (lambda: cider_d_scores(refs, hyps), lambda: Cider().compute_score(gts, res)),
        "rouge_l": (lambda: rouge_l_scores(refs, hyps), lambda: Rouge().compute_score(gts, res)),
    }
    report: dict = {"images": args.images, "refs_per_image": args.refs, "repeats": args.repeats}
    print(f"{args.images} images x {args.refs} references, best of {args.repeats}")
    for name, (ours_fn, coco_fn) in runs.items():
        t_ours, ours = best_time(ours_fn, args.repeats)
        t_coco, coco = best_time(coco_fn, args.repeats)
        if name == "bleu":
            (corpus, images), (c_corpus, c_images) = ours, coco
            assert_close(corpus, c_corpus, "BLEU corpus")
            for n in range(4):
                assert_close([img[n] for img in images], c_images[n], f"BLEU-{n + 1} per image")
            shown = f"BLEU-4 {corpus[3]:.6f}"
        else:
            (corpus, images), (c_corpus, c_images) = ours, coco
            assert_close([corpus], [float(c_corpus)], f"{name} corpus")
            assert_close(images, [float(x) for x in c_images], f"{name} per image")
            shown = f"{name} {corpus:.6f}"
        ratio = t_coco / t_ours
        report[name] = {"ours_s": round(t_ours, 4), "pycocoevalcap_s": round(t_coco, 4), "speedup": round(ratio, 2)}
        print(f"{name:8s} ours {t_ours:7.3f} s   pycocoevalcap {t_coco:7.3f} s   x{ratio:5.1f} faster   "
              f"({shown}, equal to 1e-9 corpus and per image)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
