"""Metrics against pycocoevalcap (same tokens, 1e-9) and the tokenizer against the Java PTBTokenizer."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.data.tokenize import PUNCTUATION, tokenize
from captioner.metrics import (bleu_scores, cider_d_scores, evaluate, lcs_length, meteor_available, rouge_l_scores,
                               score_tokens)

TOL = 1e-9
KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L"]

Corpus = tuple[list[list[list[str]]], list[list[str]]]  # (references, hypotheses) as tokens


# --------------------------------------------------------------------------- reference scorers


def coco_scores(refs: list[list[list[str]]], hyps: list[list[str]]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """pycocoevalcap's Bleu(4), Cider and Rouge on the same tokens, shaped like ``score_tokens``."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # The scorers take {id: [space-joined sentences]}, as the COCO pipeline produces after tokenising.
    gts = {i: [" ".join(r) for r in image_refs] for i, image_refs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
    if any(r for image_refs in refs for r in image_refs):
        c, c_img = Cider().compute_score(gts, res)
    else:  # pycocoevalcap fails on max() of no document frequencies; every weight would be 0
        c, c_img = 0.0, [0.0] * len(hyps)
    r, r_img = Rouge().compute_score(gts, res)
    corpus = {**{f"BLEU-{n + 1}": b[n] for n in range(4)}, "CIDEr-D": float(c), "ROUGE-L": float(r)}
    images = [
        {**{f"BLEU-{n + 1}": b_img[n][i] for n in range(4)}, "CIDEr-D": float(c_img[i]), "ROUGE-L": float(r_img[i])}
        for i in range(len(hyps))
    ]
    return corpus, images


def assert_matches_coco(refs: list[list[list[str]]], hyps: list[list[str]]) -> None:
    """Our scores equal pycocoevalcap's to 1e-9, corpus-level and per image."""
    want, want_images = coco_scores(refs, hyps)
    got, got_images = score_tokens(refs, hyps)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=0), key
        for i, (g, w) in enumerate(zip(got_images, want_images)):
            assert g[key] == pytest.approx(w[key], abs=TOL, rel=0), (key, i, refs[i], hyps[i])


# --------------------------------------------------------------------------- property-based comparison

# A small vocabulary so that n-grams of every order match now and then.
WORDS = ["a", "the", "man", "dog", "on", "of", "red", "bus", "two", "3", "t-shirt", "it", "'s", "café", "n't"]
sentence = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12)
image = st.tuples(st.lists(sentence, min_size=1, max_size=5), sentence)
corpus = st.lists(image, min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(corpus)
def test_random_corpora_match_pycocoevalcap(data: list) -> None:
    refs = [r for r, _ in data]
    hyps = [h for _, h in data]
    assert_matches_coco(refs, hyps)


@settings(max_examples=40, deadline=None)
@given(sentence, sentence)
def test_lcs_matches_dynamic_programming(a: list[str], b: list[str]) -> None:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            same = a[i - 1] == b[j - 1]
            table[i][j] = table[i - 1][j - 1] + 1 if same else max(table[i - 1][j], table[i][j - 1])
    assert lcs_length(a, b) == table[-1][-1] == lcs_length(b, a)


def test_pair_sort_falls_back_without_overflow() -> None:
    from captioner.metrics.ngrams import _argsort_pairs

    rng = random.Random(0)
    major = [rng.randrange(2**61) for _ in range(200)]  # too large to combine with minor in int64
    minor = [rng.randrange(50) for _ in range(200)]
    order = _argsort_pairs(np.array(major), np.array(minor), 50)
    pairs = [(major[i], minor[i]) for i in order]
    assert pairs == sorted(pairs)


def test_lcs_on_long_sentences() -> None:
    rng = random.Random(0)
    a = [rng.choice("abcde") for _ in range(300)]  # several machine words of bits
    b = [rng.choice("abcde") for _ in range(200)]
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    assert lcs_length(a, b) == prev[-1]


# --------------------------------------------------------------------------- hand-written edge cases


def T(text: str) -> list[str]:
    return text.split()


EDGE_CASES: dict[str, Corpus] = {
    "hypotheses shorter than n words": (
        [[T("a man riding a horse"), T("a man on a horse")], [T("a red bus"), T("the bus is red")],
         [T("two dogs"), T("dogs playing in snow")]],
        [T("man"), T("a bus"), T("two dogs run")],
    ),
    "empty hypothesis": (
        [[T("a man riding a horse"), T("a man on a horse")], [T("a red bus")]],
        [[], T("a red bus")],
    ),
    "empty hypothesis and empty reference": (
        [[[], T("a cat")], [T("a red bus")]],
        [[], T("a red bus")],
    ),
    "tie in reference length goes to the shorter": (
        # hypothesis of 5 words, references of 4 and 6 words: brevity uses 4, so no penalty
        [[T("a man on horse"), T("a man is on a horse")], [T("a bus on a road"), T("a red bus")]],
        [T("a man on a horse"), T("a red bus on road")],
    ),
    "no 4-gram match in the whole corpus": (
        [[T("a man riding a horse on a beach")], [T("two dogs play in the snow")]],
        [T("a man riding on a beach horse"), T("two dogs in play the snow")],
    ),
    "no 3-gram or 4-gram match": (
        [[T("a man riding a horse")], [T("the bus is red")]],
        [T("horse a riding man"), T("red is bus the")],
    ),
    "clipping by the largest count in one reference": (
        [[T("the the cat"), T("a cat on the mat")], [T("a a a dog"), T("a dog")]],
        [T("the the the the cat"), T("a a a a a")],
    ),
    "single image": (
        [[T("a man riding a horse"), T("a man on a horse")]],
        [T("a man on a horse")],
    ),
    "perfect match": (
        [[T("a man riding a horse")], [T("a red bus on a road")], [T("two dogs")]],
        [T("a man riding a horse"), T("a red bus on a road"), T("two dogs")],
    ),
    "numbers hyphens apostrophes non-ascii": (
        [[tokenize("A 10-year-old boy's T-shirt costs $5.50."), tokenize("The boy isn't wearing a T-shirt")],
         [tokenize("A café in Zürich, at 3:30 p.m."), tokenize("Crème brûlée on a plate")]],
        [tokenize("A boy's 10-year-old T-shirt."), tokenize("a café at 3:30 in Zürich")],
    ),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_pycocoevalcap(name: str) -> None:
    refs, hyps = EDGE_CASES[name]
    assert_matches_coco(refs, hyps)


def test_closest_reference_length_tie_goes_to_shorter() -> None:
    refs, hyps = EDGE_CASES["tie in reference length goes to the shorter"]
    corpus, images = bleu_scores(refs, hyps)
    # 5 hypothesis words against 4 (chosen) or 6: no brevity penalty, unigram precision 1.
    assert images[0][0] == pytest.approx(1.0, abs=1e-8)
    assert images[1][0] == pytest.approx(1.0, abs=1e-8)


def test_zero_matches_and_short_hypotheses_give_tiny_not_zero() -> None:
    refs, hyps = EDGE_CASES["no 4-gram match in the whole corpus"]
    corpus, _ = bleu_scores(refs, hyps)
    assert 0 < corpus[3] < 1e-3  # (1e-15 / total)^(1/4) times the lower orders
    _, images = bleu_scores([[T("a b c d")]], [T("a b")])
    # No trigram in the hypothesis: precision 1e-15 / 1e-9 rather than a crash, then the
    # brevity penalty exp(1 - 4/2).
    assert images[0][2] == pytest.approx((1e-6) ** (1 / 3) * math.exp(-1), rel=1e-6)


def test_cider_of_a_single_image_is_zero() -> None:
    # log(1 image) = 0 makes every tf-idf weight 0 (pycocoevalcap does the same).
    score, images = cider_d_scores([[T("a man on a horse")]], [T("a man on a horse")])
    assert score == images[0] == 0.0


def test_rouge_of_empty_hypothesis() -> None:
    assert rouge_l_scores([[T("a cat")]], [[]])[0] == 0.0
    assert rouge_l_scores([[[]]], [[]])[0] == 1.0  # pycocoevalcap's "".split(" ") == [""] matches itself


# --------------------------------------------------------------------------- evaluate() on raw strings

RAW_REFS = {
    "img1": ["A man riding a horse on the beach.", "A man on a brown horse, near the sea."],
    "img2": ["Two dogs playing in the snow!", "Dogs play in snow.", "Two dogs in the snow"],
    42: ["A 10-year-old boy's T-shirt (red).", "A boy isn't wearing his red T-shirt."],
    ("tuple", 1): ["Crème brûlée at a café in Zürich.", "A dessert on a plate"],
}
RAW_HYPS = {"img1": "A man rides a horse on a beach.", "img2": "two dogs in the snow", 42: "A boy's red T-shirt.",
            ("tuple", 1): "..."}


def test_evaluate_tokenises_and_matches_pycocoevalcap() -> None:
    got = evaluate(RAW_REFS, RAW_HYPS, per_image=True)
    ids = list(RAW_HYPS)
    refs = [[tokenize(r) for r in RAW_REFS[i]] for i in ids]
    hyps = [tokenize(RAW_HYPS[i]) for i in ids]
    assert hyps[3] == []  # "..." is empty after tokenisation
    want, want_images = coco_scores(refs, hyps)
    assert set(got) == set(KEYS) | {"per_image"}
    assert list(got["per_image"]) == ids
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=0)
        for i, w in zip(ids, want_images):
            assert got["per_image"][i][key] == pytest.approx(w[key], abs=TOL, rel=0)


def test_evaluate_ignores_references_without_hypothesis() -> None:
    extra = {**RAW_REFS, "unused": ["A plane in the sky."]}
    assert evaluate(extra, RAW_HYPS) == evaluate(RAW_REFS, RAW_HYPS)


def test_evaluate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no references"):
        evaluate({"a": ["x"]}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="empty reference list"):
        evaluate({"a": []}, {"a": "x"})
    with pytest.raises(ValueError, match="no hypotheses"):
        evaluate({"a": ["x"]}, {})
    with pytest.raises(TypeError, match="one raw string"):
        evaluate({"a": ["x"]}, {"a": ["x"]})
    with pytest.raises(TypeError, match="list of raw strings"):
        evaluate({"a": "a cat"}, {"a": "x"})


def test_meteor_without_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="java"):
        evaluate(RAW_REFS, RAW_HYPS, meteor=True)


@pytest.mark.slow
@pytest.mark.skipif(not meteor_available(), reason="METEOR needs pycocoevalcap and java")
def test_meteor_through_evaluate() -> None:
    got = evaluate(RAW_REFS, RAW_HYPS, per_image=True, meteor=True)
    assert 0 < got["METEOR"] < 1
    assert got["per_image"][("tuple", 1)]["METEOR"] == 0.0  # empty hypothesis
    assert got["per_image"]["img2"]["METEOR"] > got["per_image"][42]["METEOR"]


# --------------------------------------------------------------------------- tokenizer vs Java PTBTokenizer

ORDINARY_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing in the snow .",
    "A bathroom with a toilet,sink and shower.",
    "A kitchen with a stove, microwave, and refrigerator.",
    "a cat laying on a bed next to a laptop computer",
    "A man on a skate board doing a trick.The crowd watches",
    "A giraffe standing next to a tree in a field. ",
    "There's a dog's bowl on the floor.",
    "The dogs' toys are scattered around the room.",
    "A woman isn't wearing a hat; she's holding an umbrella.",
    "A boy can't reach the shelf, so he's standing on a chair.",
    "It's a 10-year-old boy in a red T-shirt.",
    "A sign that says \"STOP\" on a street corner.",
    "A sign that says 'no parking' next to a fire hydrant.",
    "A plate of food (rice and beans) on a table.",
    "A train traveling down the tracks at 3:30 p.m.",
    "Two people sitting on a bench in Washington, D.C.",
    "A man in a suit and tie... looking at the camera",
    "A pizza with pepperoni, mushrooms, and olives!",
    "Is this a cat or a dog?",
    "A woman holding a cell-phone to her ear",
    "An old-fashioned clock on top of a building.",
    "A close up of a sandwich on a plate",
    "The bus is parked next to the curb -- waiting for passengers.",
    "A baseball player swinging a bat at a ball",
    "A herd of sheep grazing on a lush green hillside.",
    "Mr. Smith and Dr. Jones standing on St. Mark's square.",
    "A 2.5-inch screw and 1,000 nails on a workbench.",
    "A café in Zürich with crème brûlée on the menu.",
    "Zoë's naïve painting hangs on the wall.",
    "A man wearing a shirt that reads I ♥ NY.",
    "People walking down a busy street in the U.S.",
    "A dog with a frisbee in it's mouth",
    "A young girl eating a slice of pizza .",
    "A motorcycle parked in front of a store's window.",
    "A large jet flying through a blue sky!!!",
    "Someone is gonna eat that cake, I'm sure.",
    "A tennis player hits the ball - a backhand.",
    "A bowl of soup and a glass of water on a wooden table",
    "Several elephants walking across a dirt road",
    "A person on skis going down a snowy slope; the sky is clear.",
    "A kite flying high over the beach: a sunny day.",
    "Two zebras and a giraffe in an enclosure at the zoo",
    "A vase with flowers in it , on a window sill",
    "This is a picture of a man's hand holding a remote.",
    "A teddy bear sitting on top of a pile of pillows",
    "A cat sits on a laptop computer's keyboard.",
    "An open refrigerator filled with lots of food.",
    "Three men are playing Wii in a living room",
    "A double-decker bus driving down a street in London",
    "A woman's reflection in a mirror, brushing her teeth.",
    "A plate with a hot dog and french fries on it",
    "An airplane that is sitting on the runway.",
    "A stop sign with graffiti on it that reads \"eat\".",
    "A 50% off sign in the window of a shop",
    "A laptop, a mouse & a keyboard on a desk",
    "A man with a surfboard walking on the beach at sunset",
    "A living room with a couch, tv and coffee table.",
    "Two horses pulling a cart down a country road.",
    "A yellow fire hydrant on the side of a road.",
    "The clock tower reads 12:45 at noon.",
    "Children play soccer on a field while parents watch.",
    "A bird perched on a branch of a tree",
    "A man and a woman cutting a cake at their wedding",
    "a  man   with  extra   spaces",
    "A street sign for 5th Ave. and W. 23rd St. in New York",
    "A woman in a pink dress (probably a bridesmaid)",
    "A bench that says `in memory of' on it",
    "A dog is laying down on the couch. A cat sits nearby.",
    # Flickr8k style: already spaced punctuation
    "A little boy splashes into the small pool at the end of a yellow slip n 'slide .",
    "its a distorted lens ( almost fish eye ) of a teenage boy skateboarding on a concrete block .",
    "A man in a black jacket and a woman in a `` Hooters '' shirt .",
]


def _generated_captions(n: int, seed: int = 0) -> list[str]:
    """Caption-like sentences with the punctuation habits of crowd-sourced captions."""
    rng = random.Random(seed)
    words = ("a man woman dog cat bus train pizza table street kitchen red two people is are sitting on in "
             "with next to the of it's isn't there's dog's dogs' T-shirt 10-year-old 3 1,000 5.5 café Zoë's "
             "Mr. St. U.S. p.m. can't won't I'm they're").split()
    seps = [" "] * 20 + [", ", ",", ". ", "; ", ": ", " - ", " -- ", "! ", "? ", "... ", " (", ") ", ' "', '" ', "  "]
    ends = ["", ".", " .", "!", "?", "...", "..", ".\"", ")"]
    out = []
    for _ in range(n):
        k = rng.randint(2, 14)
        parts = [rng.choice(words) + (rng.choice(seps) if i < k - 1 else rng.choice(ends)) for i in range(k)]
        text = "".join(parts)
        out.append(text[:1].upper() + text[1:] if rng.random() < 0.7 else text)
    return out


def java_ptb_tokens(captions: list[str], tmp_path: Path) -> list[list[str]]:
    """pycocoevalcap's PTBTokenizer pipeline (Stanford CoreNLP 3.4.1 jar, same flags, same filtering)."""
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH")
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    if not jar.exists():
        pytest.skip("pycocoevalcap ships without the CoreNLP jar")
    # Like the wrapper (which writes its temporary file next to the jar, inside site-packages).
    path = tmp_path / "captions.txt"
    path.write_bytes("\n".join(c.replace("\n", " ") for c in captions).encode())
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(path)]
    lines = subprocess.run(cmd, capture_output=True, check=True).stdout.decode().split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS).split()
            for line in lines[: len(captions)]]


def test_tokenizer_matches_java_ptbtokenizer(tmp_path: Path) -> None:
    captions = ORDINARY_CAPTIONS + _generated_captions(400)
    java = java_ptb_tokens(captions, tmp_path)
    mismatches = [(c, j, tokenize(c)) for c, j in zip(captions, java) if tokenize(c) != j]
    assert not mismatches, "\n".join(f"{c!r}\n  java: {j}\n  ours: {o}" for c, j, o in mismatches[:10])


def test_tokenizer_examples() -> None:
    assert tokenize("A man's hat (red) isn't there.") == ["a", "man", "'s", "hat", "-lrb-", "red", "-rrb-", "is", "n't",
                                                          "there"]
    assert tokenize("Mr. Smith lives in the U.S. now") == ["mr.", "smith", "lives", "in", "the", "u.s.", "now"]
    assert tokenize("A toilet,sink and shower.The end") == ["a", "toilet", "sink", "and", "shower.the", "end"]
    assert tokenize("It costs $5.50 -- 50% off!!!") == ["it", "costs", "$", "5.50", "50", "%", "off", "!!!"]
    assert tokenize("“Curly” ‘quotes’ and it’s…") == ["curly", "quotes", "and", "it", "'s"]
    assert tokenize("") == [] and tokenize(" ... ") == []
    assert not PUNCTUATION & set(tokenize(" ".join(ORDINARY_CAPTIONS)))
