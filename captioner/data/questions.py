"""Visual questions about shapes-world scenes: generated with ground truth, balanced, and checked independently.

Four question types, each with one-word answers:

* ``attribute``: "what colour is the large circle?" / "what shape is the red object?" / "what size is the
  blue square?" The referring expression never uses the attribute asked for and matches exactly one
  object of the scene (objects are distinct (size, colour, shape) triples, but "the red object" may not be).
* ``exist``: "is there a green triangle?" (yes / no), about one to three attributes.
* ``count``: "how many squares are there?" / "how many red objects are there?" / "how many large objects
  are there?" (0-3).
* ``relation``: "what colour is the object to the left of the small square?" The relation is the
  scene's own rule (:func:`captioner.data.shapes.relation`, the one the captions use: the dominant axis of
  the offset of the box centres), asked only when it has one answer: exactly one object stands in that
  relation to the landmark, and every object's offset from the landmark is at least
  :func:`~captioner.data.shapes.default_margin` pixels away from a tie between the axes.

Each :class:`Question` stores its type, its *form* (the type plus what it asks about: ``attribute/color``,
``count/shape``, ``exist/color+shape``, ...), its answer, the ids (indices into the scene's objects, in
their stored canonical order) of the objects the answer is about (the referred object; every matching
object for exist/count, none for a "no"), and for relations the landmark's id.

**Determinism.** The questions of an image are a function of its objects and ``(seed, split, index)``
only, drawn from their own random stream (:func:`question_rng`), so any subset of a split can be
generated in any order.

**Balance, by choice of questions.** A *cell* is a (form, answer) pair, e.g. (``count/shape``, ``3``).
Some cells are rare: three objects of one colour are in about 1% of the scenes. If each scene simply got
a question per form, answers would follow the scenes (mostly "0" and "1" for counts) and a model that
never looks at the image would do well. Instead, every cell of a scene that *can* be asked (it has at
least one candidate question) is asked with probability ``keep = lambda / p``, where ``p`` is the
fraction of scenes in which the cell can be asked (estimated once per world setting, see
:func:`cell_rates`) and ``lambda`` a constant of the form; then one of the cell's candidate questions
is chosen uniformly. Each cell therefore yields ``lambda`` questions per scene in expectation, whatever
its rarity: answers are uniform within each form, hence within each type, and a question-only model
can do no better than guessing among the answers the question's words allow (what the ``majority per
form`` baseline measures). ``exist`` and ``count`` balance each form on its own (the most capacity);
``attribute`` and ``relation`` use one ``lambda`` for all their forms, so each of their eleven answers
(five colours, four shapes, two sizes) is equally frequent. ``lambda`` is scaled down so each type
gives at most ``per_type`` questions per image in expectation; count questions are capacity-bound (the
rare "3" cells) at about 0.6 per image, mostly ``count/size`` ones. Each cell contributes at most one
question per scene, so a scene never repeats a question.

:func:`check_question` re-derives answer and object ids from the question's *text* and the objects'
raw fields by a separate code path (a parser and its own geometry); the tests run it on every question.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from typing import Any, NamedTuple

import numpy as np

from captioner.data import shapes
from captioner.data.shapes import COLORS, MAX_OBJECTS, SHAPES, SIZES, SPLITS, SceneObject, default_margin, relation, sample_layout
from captioner.data.tokenize import tokenize

QUESTION_TYPES: tuple[str, ...] = ("attribute", "exist", "count", "relation")
ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape")  # SceneObject fields, in caption word order
ASKED_AS = {"size": "size", "color": "colour", "shape": "shape"}  # the word a question uses for the attribute
VALUES: dict[str, tuple[str, ...]] = {"size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES}
COUNT_ANSWERS: tuple[str, ...] = tuple(str(k) for k in range(MAX_OBJECTS + 1))
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *SIZES, "yes", "no", *COUNT_ANSWERS)
RELATION_PHRASES: dict[str, str] = shapes._RELATIONS["long"]  # the captions' own wording: "to the left of", "above", ...
_QUESTION_STREAM = 0x5141  # mixed into the seed so question draws never coincide with a scene's own stream

Description = tuple[tuple[str, str], ...]  # (attribute, value) pairs in ATTRIBUTES order; () is "object"


@dataclass(frozen=True)
class Form:
    """What a question asks, e.g. ``count/shape``: its type, the attribute(s) it is about, its possible answers."""

    type: str
    about: str  # attribute asked for (attribute, relation, count) or the attributes described (exist: "color+shape")
    answers: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.type}/{self.about}"


FORMS: tuple[Form, ...] = (
    *(Form("attribute", a, VALUES[a]) for a in ("color", "shape", "size")),
    *(Form("exist", d, ("yes", "no")) for d in ("color", "shape", "color+shape", "size+shape", "size+color+shape")),
    *(Form("count", a, COUNT_ANSWERS) for a in ("shape", "color", "size")),
    *(Form("relation", a, VALUES[a]) for a in ("color", "shape", "size")),
)
# "type": one lambda for all forms of the type (its answers equally frequent); "form": one per form.
BALANCE = {"attribute": "type", "exist": "form", "count": "form", "relation": "type"}


class Question(NamedTuple):
    """One question about a scene, with its ground truth (a NamedTuple: a scene's candidates are made by the hundred)."""

    text: str
    type: str
    form: str
    answer: str
    object_ids: tuple[int, ...]  # the objects the answer is about (referred object; all matching objects)
    landmark_ids: tuple[int, ...] = ()  # relation questions: the object the relation is relative to

    @property
    def tokens(self) -> list[str]:
        """The question's words, as the captioning tokenizer splits them (no "?")."""
        return tokenize(self.text)

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {"text": self.text, "type": self.type, "form": self.form, "answer": self.answer,
                "object_ids": list(self.object_ids), "landmark_ids": list(self.landmark_ids)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Question:
        """Inverse of :meth:`to_json`."""
        return cls(d["text"], d["type"], d["form"], d["answer"], tuple(d["object_ids"]), tuple(d.get("landmark_ids", ())))


# --------------------------------------------------------------------------------------------------
# Words
def phrase(desc: Description) -> str:
    """'large red circle', 'red object', 'circle', 'object': the described values, the shape (or 'object') last."""
    d = dict(desc)
    return " ".join([d[a] for a in ("size", "color") if a in d] + [d.get("shape", "object")])


def describe(obj: SceneObject, attributes: Iterable[str]) -> Description:
    """The description of ``obj`` by ``attributes``."""
    chosen = set(attributes)
    return tuple((a, getattr(obj, a)) for a in ATTRIBUTES if a in chosen)


def matching(objects: Sequence[SceneObject], desc: Description) -> tuple[int, ...]:
    """Indices of the objects a description fits."""
    return tuple(i for i, o in enumerate(objects) if all(getattr(o, a) == v for a, v in desc))


def _subsets(attributes: Sequence[str]) -> list[tuple[str, ...]]:
    return [c for k in range(len(attributes) + 1) for c in combinations(attributes, k)]


def unique_descriptions(objects: Sequence[SceneObject], i: int, attributes: Sequence[str]) -> list[Description]:
    """Descriptions of object ``i`` by subsets of ``attributes`` that fit it and no other object."""
    out = []
    for subset in _subsets(attributes):
        desc = describe(objects[i], subset)
        if matching(objects, desc) == (i,):
            out.append(desc)
    return out


def clear_offset(a: SceneObject, b: SceneObject, margin: float) -> bool:
    """Whether the dominant axis of the offset between two box centres wins by at least ``margin`` pixels."""
    (ax, ay), (bx, by) = a.center, b.center
    return abs(abs(ax - bx) - abs(ay - by)) >= margin


# --------------------------------------------------------------------------------------------------
# Every question a scene allows, by form and answer
def candidates(objects: Sequence[SceneObject], image_size: int) -> dict[str, dict[str, list[Question]]]:
    """All valid questions about a scene: ``{form key: {answer: [questions]}}``, in a fixed order."""
    out: dict[str, dict[str, list[Question]]] = {f.key: {} for f in FORMS}

    def add(q: Question) -> None:
        out[q.form].setdefault(q.answer, []).append(q)

    for i, obj in enumerate(objects):
        for asked in ("color", "shape", "size"):
            for desc in unique_descriptions(objects, i, [a for a in ATTRIBUTES if a != asked]):
                add(Question(f"what {ASKED_AS[asked]} is the {phrase(desc)}?", "attribute", f"attribute/{asked}",
                             getattr(obj, asked), (i,)))
    for form_key, desc, text in _EXIST_AND_COUNT:
        ids = matching(objects, desc)
        if form_key.startswith("exist/"):
            add(Question(text, "exist", form_key, "yes" if ids else "no", ids))
        else:
            add(Question(text, "count", form_key, str(len(ids)), ids))
    for q in relation_questions(objects, image_size):
        add(q)
    return out


def _exist_and_count() -> list[tuple[str, Description, str]]:
    """(form key, description, text) of every exist and count question: the same for every scene."""
    out = []
    for form in (f for f in FORMS if f.type == "exist"):
        attrs = [a for a in ATTRIBUTES if a in form.about.split("+")]
        descs: list[Description] = [()]
        for a in attrs:
            descs = [d + ((a, v),) for d in descs for v in VALUES[a]]
        out += [(form.key, d, f"is there a {phrase(d)}?") for d in descs]
    for asked in ("shape", "color", "size"):
        for value in VALUES[asked]:
            text = f"how many {value}s are there?" if asked == "shape" else f"how many {value} objects are there?"
            out.append((f"count/{asked}", ((asked, value),), text))
    return out


_EXIST_AND_COUNT = _exist_and_count()


def relation_triples(objects: Sequence[SceneObject], image_size: int) -> list[tuple[int, int, str]]:
    """(target, landmark, relation) where the target is the one object in that relation to the landmark, all offsets clear."""
    margin = default_margin(image_size)
    out = []
    for j, landmark in enumerate(objects):
        others = [i for i in range(len(objects)) if i != j]
        if not others or not all(clear_offset(objects[i], landmark, margin) for i in others):
            continue
        for rel in RELATION_PHRASES:
            targets = [i for i in others if relation(objects[i], landmark) == rel]
            if len(targets) == 1:
                out.append((targets[0], j, rel))
    return out


def relation_questions(objects: Sequence[SceneObject], image_size: int) -> list[Question]:
    """Questions about the one object in a given relation to a landmark (only where the relation is clear)."""
    out = []
    for i, j, rel in relation_triples(objects, image_size):
        for desc in unique_descriptions(objects, j, ATTRIBUTES):
            if not desc:
                continue  # "the object" fits only a one-object scene, which has no relations
            for asked in ("color", "shape", "size"):
                out.append(Question(f"what {ASKED_AS[asked]} is the object {RELATION_PHRASES[rel]} the {phrase(desc)}?",
                                    "relation", f"relation/{asked}", getattr(objects[i], asked), (i,), (j,)))
    return out


def feasible_cells(objects: Sequence[SceneObject], image_size: int) -> set[tuple[str, str]]:
    """The (form key, answer) cells that have a candidate question: the keys of :func:`candidates`, without making them."""
    cells = set()
    for i, obj in enumerate(objects):
        for asked in ("color", "shape", "size"):
            if unique_descriptions(objects, i, [a for a in ATTRIBUTES if a != asked]):
                cells.add((f"attribute/{asked}", getattr(obj, asked)))
    for form in (f for f in FORMS if f.type == "exist"):
        attrs = [a for a in ATTRIBUTES if a in form.about.split("+")]
        present = {describe(o, attrs) for o in objects}
        if present:
            cells.add((form.key, "yes"))
        if len(present) < math.prod(len(VALUES[a]) for a in attrs):
            cells.add((form.key, "no"))
    for asked in ("shape", "color", "size"):
        counts = Counter(getattr(o, asked) for o in objects)
        cells.update((f"count/{asked}", str(counts.get(v, 0))) for v in VALUES[asked])
    for i, j, _ in relation_triples(objects, image_size):
        if any(unique_descriptions(objects, j, ATTRIBUTES)):
            cells.update((f"relation/{asked}", getattr(objects[i], asked)) for asked in ("color", "shape", "size"))
    return cells


# --------------------------------------------------------------------------------------------------
# Balance: how often each (form, answer) cell can be asked, and how often it is kept
@lru_cache(maxsize=8)
def cell_rates(image_size: int = 64, min_objects: int = 1, max_objects: int = MAX_OBJECTS,
               scenes: int = 4000) -> dict[tuple[str, str], float]:
    """Fraction of scenes in which each (form key, answer) cell has a candidate question (Monte Carlo).

    The layouts are drawn as :func:`captioner.data.shapes.make_scene` draws them, from a fixed stream
    that no dataset uses, so the estimate is a constant of the world's settings (about 1 s to compute).
    """
    rng = np.random.default_rng([_QUESTION_STREAM, image_size, min_objects, max_objects])
    seen: Counter[tuple[str, str]] = Counter()
    for _ in range(scenes):
        objects = sample_layout(rng, image_size, int(rng.integers(min_objects, max_objects + 1)))
        seen.update(feasible_cells(objects, image_size))
    return {(f.key, a): seen[(f.key, a)] / scenes for f in FORMS for a in f.answers}


def keep_rates(rates: Mapping[tuple[str, str], float], per_type: float) -> dict[tuple[str, str], float]:
    """Probability of asking each possible cell of a scene, so every cell of a form (or type) is equally frequent.

    Cells that never occur (``rate == 0``, e.g. count 3 in a world of at most two objects) are left out.
    """
    keep: dict[tuple[str, str], float] = {}
    for qtype in QUESTION_TYPES:
        forms = [f for f in FORMS if f.type == qtype]
        floor = {f.key: min((rates[(f.key, a)] for a in f.answers if rates[(f.key, a)] > 0), default=0.0) for f in forms}
        if BALANCE[qtype] == "type":
            low = min((v for v in floor.values() if v > 0), default=0.0)
            floor = {k: low if v > 0 else 0.0 for k, v in floor.items()}
        capacity = sum(floor[f.key] * sum(rates[(f.key, a)] > 0 for a in f.answers) for f in forms)  # questions per scene
        scale = min(1.0, per_type / capacity) if capacity > 0 else 0.0
        for f in forms:
            for a in f.answers:
                p = rates[(f.key, a)]
                keep[(f.key, a)] = min(1.0, scale * floor[f.key] / p) if p > 0 else 0.0
    return keep


def question_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The question stream of one image: depends only on (seed, split, index)."""
    return np.random.default_rng([seed, SPLITS.index(split), index, _QUESTION_STREAM])


def generate_questions(objects: Sequence[SceneObject], seed: int, split: str, index: int, image_size: int = 64,
                       keep: Mapping[tuple[str, str], float] | None = None,
                       types: Sequence[str] = QUESTION_TYPES) -> list[Question]:
    """The balanced questions of one scene (``keep`` from :func:`keep_rates`; default: the 64 px world, 1 per type)."""
    if keep is None:
        keep = keep_rates(cell_rates(image_size), 1.0)
    unknown = set(types) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; expected some of {QUESTION_TYPES}")
    rng = question_rng(seed, split, index)
    cands = candidates(objects, image_size)
    out = []
    for form in FORMS:
        for answer in form.answers:
            u, pick = rng.random(2)  # drawn for every cell, so one cell's choice never shifts another's
            pool = cands[form.key].get(answer)
            if pool and form.type in types and u < keep[(form.key, answer)]:
                out.append(pool[int(pick * len(pool))])
    return out


def scene_objects(objects: Sequence[Mapping[str, Any]]) -> list[SceneObject]:
    """SceneObjects from the dataset JSON's ``objects`` entries."""
    return [SceneObject(o["shape"], o["color"], o["size"], tuple(int(v) for v in o["bbox"])) for o in objects]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Baselines that ignore the image
def majority_baseline(train: Iterable[Question], test: Sequence[Question]) -> dict[str, float]:
    """Accuracy on ``test`` of answering the most frequent training answer of the question's type (and of its form)."""
    by_type: dict[str, Counter[str]] = {}
    by_form: dict[str, Counter[str]] = {}
    for q in train:
        by_type.setdefault(q.type, Counter())[q.answer] += 1
        by_form.setdefault(q.form, Counter())[q.answer] += 1
    out: dict[str, float] = {}
    for name, table, key in (("majority", by_type, "type"), ("majority_per_form", by_form, "form")):
        hits = {t: [] for t in QUESTION_TYPES}
        for q in test:
            counts = table.get(getattr(q, key))
            hits[q.type].append(bool(counts) and counts.most_common(1)[0][0] == q.answer)
        out.update({f"{name}/{t}": sum(h) / len(h) for t, h in hits.items() if h})
        out[name] = sum(sum(h) for h in hits.values()) / max(1, sum(len(h) for h in hits.values()))
    return out


# --------------------------------------------------------------------------------------------------
# The independent check: answers recomputed from the words of the question and the raw object fields
class QuestionError(ValueError):
    """A question's words do not pick out what they must (no unique referent, an unclear relation, a bad form)."""


_WHAT_REL = re.compile(r"what (colour|shape|size) is the object (to the left of|to the right of|above|below) the ([a-z ]+)\?")
_WHAT = re.compile(r"what (colour|shape|size) is the ([a-z ]+)\?")
_EXIST = re.compile(r"is there a ([a-z ]+)\?")
_COUNT_SHAPE = re.compile(r"how many ([a-z]+)s are there\?")
_COUNT_OBJECTS = re.compile(r"how many ([a-z]+) objects are there\?")


def _parse_words(words: str) -> dict[str, str]:
    """'large red circle' -> {'size': 'large', 'color': 'red', 'shape': 'circle'}; 'object' stands for any shape."""
    parts = words.split()
    if not parts:
        raise QuestionError("empty description")
    found: dict[str, str] = {}
    for k, w in enumerate(parts):
        if w == "object" and k == len(parts) - 1:
            continue
        field = next((f for f, vals in (("size", SIZES), ("color", COLORS), ("shape", SHAPES)) if w in vals), None)
        if field is None or field in found or (field == "shape" and k != len(parts) - 1):
            raise QuestionError(f"cannot read the description {words!r}")
        found[field] = w
    return found


def _fits(o: Mapping[str, Any], want: Mapping[str, str]) -> bool:
    return all(o[f] == v for f, v in want.items())


def _side(o: Mapping[str, Any], ref: Mapping[str, Any], margin: float) -> str:
    """Where ``o`` is relative to ``ref`` by the larger offset of the box centres; QuestionError near a tie."""
    dx = (o["bbox"][0] + o["bbox"][2] - ref["bbox"][0] - ref["bbox"][2]) / 2
    dy = (o["bbox"][1] + o["bbox"][3] - ref["bbox"][1] - ref["bbox"][3]) / 2
    if abs(abs(dx) - abs(dy)) < margin:
        raise QuestionError(f"offset ({dx}, {dy}) is too close to a tie between the axes")
    if abs(dx) > abs(dy):
        return "to the right of" if dx > 0 else "to the left of"
    return "below" if dy > 0 else "above"


def check_question(text: str, objects: Sequence[Mapping[str, Any] | SceneObject],
                   image_size: int = 64) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(answer, object ids, landmark ids) of a question, from its text and the objects' fields alone."""
    objs = [o.to_json() if isinstance(o, SceneObject) else dict(o) for o in objects]
    field = {"colour": "color", "shape": "shape", "size": "size"}
    if m := _WHAT_REL.fullmatch(text):
        asked, rel, words = field[m[1]], m[2], m[3]
        landmarks = [i for i, o in enumerate(objs) if _fits(o, _parse_words(words))]
        if len(landmarks) != 1:
            raise QuestionError(f"{text!r}: 'the {words}' fits {len(landmarks)} objects")
        j = landmarks[0]
        margin = default_margin(image_size)
        sides = {i: _side(o, objs[j], margin) for i, o in enumerate(objs) if i != j}
        targets = [i for i, s in sides.items() if s == rel]
        if len(targets) != 1:
            raise QuestionError(f"{text!r}: {len(targets)} objects are {rel} the landmark")
        return objs[targets[0]][asked], (targets[0],), (j,)
    if m := _WHAT.fullmatch(text):
        asked, want = field[m[1]], _parse_words(m[2])
        if asked in want:
            raise QuestionError(f"{text!r}: the description gives the answer away")
        ids = [i for i, o in enumerate(objs) if _fits(o, want)]
        if len(ids) != 1:
            raise QuestionError(f"{text!r}: the description fits {len(ids)} objects")
        return objs[ids[0]][asked], (ids[0],), ()
    if m := _EXIST.fullmatch(text):
        ids = tuple(i for i, o in enumerate(objs) if _fits(o, _parse_words(m[1])))
        return ("yes" if ids else "no"), ids, ()
    m = _COUNT_SHAPE.fullmatch(text)
    if m and m[1] in SHAPES:
        want = {"shape": m[1]}
    elif (m := _COUNT_OBJECTS.fullmatch(text)) and (m[1] in COLORS or m[1] in SIZES):
        want = {("color" if m[1] in COLORS else "size"): m[1]}
    else:
        raise QuestionError(f"{text!r}: not a question this generator asks")
    ids = tuple(i for i, o in enumerate(objs) if _fits(o, want))
    return str(len(ids)), ids, ()
