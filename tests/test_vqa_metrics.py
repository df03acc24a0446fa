"""VQA metrics on a hand-made fixture whose figures are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from captioner.data.questions import QUESTION_TYPES
from captioner.metrics.vqa import accuracy_by_type, attention_localisation

A, E, C, R = (QUESTION_TYPES.index(t) for t in ("attribute", "exist", "count", "relation"))


def _one_hot(*cells: int, L: int = 4) -> torch.Tensor:
    """(K, L) attention of K glimpses, each a sharp peak (0.7 on one cell, 0.1 elsewhere)."""
    a = torch.full((len(cells), L), 0.1)
    for k, c in enumerate(cells):
        a[k, c] = 0.7
    return a


def test_accuracy_per_type():
    types = torch.tensor([A, A, R, R, E, C])
    answers = torch.tensor([5, 6, 7, 8, 9, 10])
    predicted = torch.tensor([5, 0, 7, 0, 9, 0])
    m = accuracy_by_type(predicted, answers, types)
    assert m["accuracy"] == 0.5 and m["questions"] == 6
    assert (m["accuracy/attribute"], m["accuracy/relation"], m["accuracy/exist"], m["accuracy/count"]) == (0.5, 0.5, 1.0, 0.0)
    assert m["questions/attribute"] == 2 and "accuracy/other" not in m


def test_localisation_uses_the_last_glimpse_and_the_answer_box():
    # A 2x2 grid on a 64x64 image: cell centres (16, 16), (48, 16), (16, 48), (48, 48), row-major.
    alphas = torch.stack([
        _one_hot(3, 0),  # attribute, box = top half: last glimpse on cell 0 (16, 16) -> inside
        _one_hot(1, 0),  # attribute, box = top-right quarter: the first glimpse would hit, the last (cell 0) misses
        _one_hot(0, 2),  # relation, box around (16, 48) -> inside
        _one_hot(0, 3),  # relation, box whose corner is the centre (48, 48): on the edge counts as inside
        _one_hot(0, 0),  # exist: no box, not scored
        _one_hot(0, 1),  # count: not scored
    ])  # (6, 2, 4)
    boxes = torch.tensor([[0, 0, 64, 32], [32, 0, 64, 32], [10, 40, 30, 60], [48, 48, 60, 60], [-1] * 4, [-1] * 4], dtype=torch.float32)
    types = torch.tensor([A, A, R, R, E, C])
    m = attention_localisation(alphas, boxes, types, grid=(2, 2), image_hw=(64, 64))
    assert m["localisation"] == 0.75
    assert m["localisation/attribute"] == 0.5 and m["localisation/relation"] == 1.0
    # chance: the fraction of the four cell centres inside each box (2/4, then 1/4 three times)
    assert m["localisation_chance"] == pytest.approx((0.5 + 0.25 * 3) / 4, rel=1e-12)
    assert m["localisation/attribute_chance"] == pytest.approx(0.375, rel=1e-12)


def test_localisation_on_the_shapes_grid():
    """8x8 grid on 64 px: a peak on the cell under an object's centre lands in its box; a peak a few cells away does not."""
    box = torch.tensor([[20.0, 36.0, 36.0, 52.0]])  # a 16 px object centred on (28, 44): cell row 5, column 3
    alpha_in = torch.zeros(1, 1, 64)
    alpha_in[0, 0, 5 * 8 + 3] = 1.0
    alpha_out = torch.zeros(1, 1, 64)
    alpha_out[0, 0, 1 * 8 + 6] = 1.0
    types = torch.tensor([A])
    assert attention_localisation(alpha_in, box, types, (8, 8), (64, 64))["localisation"] == 1.0
    assert attention_localisation(alpha_out, box, types, (8, 8), (64, 64))["localisation"] == 0.0
    with pytest.raises(ValueError, match="grid"):
        attention_localisation(alpha_in, box, types, (4, 4), (64, 64))
