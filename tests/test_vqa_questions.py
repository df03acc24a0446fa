"""The question generator: deterministic, answers recomputed independently, unique referring expressions, balanced answers."""

from __future__ import annotations

from collections import Counter

import pytest

from captioner.data.questions import (
    ANSWERS, FORMS, QUESTION_TYPES, Question, QuestionError, candidates, cell_rates, check_question, generate_questions,
    keep_rates, majority_baseline,
)
from captioner.data.shapes import SceneObject, sample_layout, scene_rng


def _scene(split: str, index: int, seed: int = 0) -> list[SceneObject]:
    """The objects of shapes image (seed, split, index), drawn exactly as make_scene draws them."""
    rng = scene_rng(seed, split, index)
    return sample_layout(rng, 64, int(rng.integers(1, 4)))


@pytest.fixture(scope="module")
def keep():
    return keep_rates(cell_rates(64), 1.0)


@pytest.fixture(scope="module")
def many(keep):
    """Questions of the first 600 training scenes: (objects, questions) pairs."""
    return [(objs, generate_questions(objs, 0, "train", i, 64, keep)) for i, objs in enumerate(_scene("train", i) for i in range(600))]


# A hand-made scene: a small red circle left of a large blue square, a large red triangle below both.
LEFT = SceneObject("circle", "red", "small", (4, 4, 20, 20))  # centre (12, 12)
RIGHT = SceneObject("square", "blue", "large", (36, 2, 62, 28))  # centre (49, 15)
BELOW = SceneObject("triangle", "red", "large", (18, 36, 44, 62))  # centre (31, 49)
SCENE = [LEFT, RIGHT, BELOW]


def test_hand_made_scene_answers():
    cands = candidates(SCENE, 64)
    texts = {q.text: q for cells in cands.values() for qs in cells.values() for q in qs}
    q = texts["what colour is the circle?"]
    assert (q.answer, q.object_ids, q.type) == ("red", (0,), "attribute")
    assert texts["what shape is the blue object?"].answer == "square"
    assert texts["what size is the red circle?"].answer == "small"
    assert "what shape is the red object?" not in texts  # two red objects: not a referring expression
    assert "what colour is the large object?" not in texts  # two large objects
    assert texts["how many red objects are there?"].answer == "2"
    assert texts["how many red objects are there?"].object_ids == (0, 2)
    assert texts["how many diamonds are there?"].answer == "0"
    assert texts["how many large objects are there?"].answer == "2"
    assert texts["is there a blue square?"].answer == "yes" and texts["is there a blue circle?"].answer == "no"
    assert texts["is there a small red circle?"].object_ids == (0,)
    q = texts["what colour is the object to the left of the square?"]
    assert (q.answer, q.object_ids, q.landmark_ids, q.type) == ("red", (0,), (1,), "relation")
    assert texts["what shape is the object below the blue object?"].answer == "triangle"
    # the triangle is below both the circle (dy 37 > dx 19) and the square: "the object above the triangle" is ambiguous
    assert not any(t.startswith("what colour is the object above the triangle") for t in texts)


def test_relations_near_a_tie_are_not_asked():
    a = SceneObject("circle", "red", "small", (4, 4, 20, 20))  # centre (12, 12)
    b = SceneObject("square", "blue", "small", (30, 28, 46, 44))  # centre (38, 36): dx 26, dy 24, a tie within 8 px
    assert not any(q.type == "relation" for cells in candidates([a, b], 64).values() for qs in cells.values() for q in qs)
    with pytest.raises(QuestionError, match="tie"):
        check_question("what colour is the object to the left of the square?", [a, b])


def test_checker_rejects_ambiguous_and_giveaway_questions():
    with pytest.raises(QuestionError, match="fits 2"):
        check_question("what shape is the red object?", SCENE)
    with pytest.raises(QuestionError, match="gives the answer away"):
        check_question("what colour is the red circle?", SCENE)
    with pytest.raises(QuestionError, match="not a question"):
        check_question("how many ideas are there?", SCENE)
    assert check_question("what colour is the object to the left of the square?", SCENE) == ("red", (0,), (1,))


def test_deterministic_and_independent_of_order(keep):
    first = [generate_questions(_scene("val", i), 3, "val", i, 64, keep) for i in range(40)]
    again = [generate_questions(_scene("val", i), 3, "val", i, 64, keep) for i in reversed(range(40))][::-1]
    assert first == again
    assert [q.to_json() for q in first[7]] == [q.to_json() for q in generate_questions(_scene("val", 7), 3, "val", 7, 64, keep)]
    other_seed = [generate_questions(_scene("val", i), 4, "val", i, 64, keep) for i in range(40)]
    assert other_seed != first  # the question seed matters
    assert all(Question.from_json(q.to_json()) == q for qs in first for q in qs)


def test_every_stored_answer_is_recomputed_by_the_independent_check(many):
    n = 0
    for objs, qs in many:
        raw = [o.to_json() for o in objs]  # the checker reads the dataset JSON's plain fields
        for q in qs:
            assert check_question(q.text, raw) == (q.answer, q.object_ids, q.landmark_ids), q
            assert q.answer in ANSWERS and q.tokens[-1] != "?"
            n += 1
    assert n > 1500


def test_referring_expressions_pick_out_one_object(many):
    """Attribute questions and relation landmarks name exactly one object; relation targets are unique."""
    for objs, qs in many:
        for q in qs:
            if q.type in ("attribute", "relation"):
                assert len(q.object_ids) == 1
                _, ids, landmark = check_question(q.text, objs)  # raises unless exactly one object fits
                assert ids == q.object_ids and landmark == q.landmark_ids
            if q.type == "relation":
                assert q.landmark_ids[0] != q.object_ids[0]


@pytest.mark.slow
def test_answers_balanced_within_each_type(keep):
    """On 2500 fresh scenes every answer of a type is within 20% of its share (a few standard errors)."""
    qs = [q for i in range(2500) for q in generate_questions(_scene("test", i), 0, "test", i, 64, keep)]
    for t in QUESTION_TYPES:
        counts = Counter(q.answer for q in qs if q.type == t)
        answers = {a for f in FORMS if f.type == t for a in f.answers}
        assert set(counts) == answers, t
        mean = sum(counts.values()) / len(answers)
        assert all(abs(c / mean - 1) < 0.2 for c in counts.values()), (t, counts)
    for form in ("count/size", "exist/color+shape", "exist/size+color+shape"):  # each form balanced on its own too
        counts = Counter(q.answer for q in qs if q.form == form)
        assert max(counts.values()) / min(counts.values()) < 1.35, (form, counts)
    per_type = Counter(q.type for q in qs)
    assert all(per_type[t] / 2500 == pytest.approx(1.0, rel=0.1) for t in ("attribute", "exist", "relation"))
    assert 0.4 < per_type["count"] / 2500 < 0.8  # bounded by the rare "3" cells


def test_keep_rates_equalise_the_expected_yield_of_every_cell():
    rates = cell_rates(64)
    keep = keep_rates(rates, 1.0)
    for t in QUESTION_TYPES:
        forms = [f for f in FORMS if f.type == t]
        yields = {(f.key, a): keep[(f.key, a)] * rates[(f.key, a)] for f in forms for a in f.answers}
        for f in forms:
            ys = [yields[(f.key, a)] for a in f.answers]
            assert max(ys) == pytest.approx(min(ys), rel=1e-12)  # uniform within the form
        if t in ("attribute", "relation"):  # and across the type's forms: its eleven answers equally often
            assert max(yields.values()) == pytest.approx(min(yields.values()), rel=1e-12)
        assert all(0 <= k <= 1 for k in keep.values())
    # a world of at most two objects never has count 3: that cell is not asked, the others stay balanced
    two = keep_rates({**rates, ("count/size", "3"): 0.0}, 1.0)
    assert two[("count/size", "3")] == 0.0 and two[("count/size", "0")] > 0


def test_majority_baseline_on_hand_made_lists():
    def q(t, form, a):
        return Question("x", t, form, a, ())

    train = [q("exist", "exist/color", "yes")] * 3 + [q("exist", "exist/shape", "no")] * 2 + [q("count", "count/size", "1")]
    test = [q("exist", "exist/color", "yes"), q("exist", "exist/shape", "no"), q("count", "count/size", "2")]
    out = majority_baseline(train, test)
    assert out["majority/exist"] == 0.5 and out["majority/count"] == 0.0 and out["majority"] == pytest.approx(1 / 3)
    assert out["majority_per_form/exist"] == 1.0 and out["majority_per_form"] == pytest.approx(2 / 3)


def test_question_streams_do_not_touch_the_scenes():
    """Generating questions draws from its own stream: the scene of an image is the same before and after."""
    before = _scene("train", 5)
    generate_questions(before, 0, "train", 5)
    assert _scene("train", 5) == before


def test_feasible_cells_are_the_cells_that_have_candidates(many):
    """cell_rates counts cells with a cheaper function than making every question: the two agree scene by scene."""
    from captioner.data.questions import feasible_cells

    for objs, _ in many[:300]:
        cands = candidates(objs, 64)
        assert feasible_cells(objs, 64) == {(f, a) for f, cells in cands.items() for a, qs in cells.items() if qs}
