"""VQA metrics: accuracy overall and per question type, and attention localisation on the answer's object.

*Localisation* is the fraction of attribute and relation questions (the ones whose answer is about one
object) for which the peak of the last glimpse's attention, mapped to the centre of its grid cell in
image pixels, lies in the box of that object (``[x0, y0, x1, y1]``; a centre on the box's edge counts,
as in the captioning localisation of :mod:`captioner.metrics.localisation`). Its chance level is what a
uniformly random cell would score: the mean fraction of cell centres inside the box.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from captioner.data.questions import QUESTION_TYPES
from captioner.metrics.localisation import cell_centres

LOCALISED_TYPES: tuple[str, ...] = ("attribute", "relation")


def accuracy_by_type(predicted: Tensor, answers: Tensor, types: Tensor,
                     type_names: Sequence[str] = QUESTION_TYPES) -> dict[str, float]:
    """``accuracy`` over all questions and ``accuracy/<type>`` for every type present; inputs (N,), types index ``type_names``."""
    hit = predicted.eq(answers)  # (N,)
    out = {"accuracy": float(hit.double().mean()) if hit.numel() else 0.0, "questions": float(hit.numel())}
    for t, name in enumerate(type_names):
        mine = types.eq(t)  # (N,)
        if bool(mine.any()):
            out[f"accuracy/{name}"] = float(hit[mine].double().mean())
            out[f"questions/{name}"] = float(mine.sum())
    return out


def inside_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """(..., 2) x, y points against (..., 4) boxes [x0, y0, x1, y1], edges included -> bool (...)."""
    x, y = points[..., 0], points[..., 1]
    return (x >= boxes[..., 0]) & (x <= boxes[..., 2]) & (y >= boxes[..., 1]) & (y <= boxes[..., 3])


def attention_localisation(alphas: Tensor, boxes: Tensor, types: Tensor, grid: tuple[int, int],
                           image_hw: tuple[float, float], type_names: Sequence[str] = QUESTION_TYPES) -> dict[str, float]:
    """Localisation of the last glimpse's peak, for attribute and relation questions.

    ``alphas`` (N, K, L) attention of K glimpses over a row-major ``grid`` (h, w) = L cells; ``boxes``
    (N, 4) the answer's object in pixels of an image of size ``image_hw`` (H, W); ``types`` (N,).
    Returns ``localisation`` (both types), ``localisation/<type>`` and their ``*_chance`` levels.
    """
    centres = cell_centres(grid[0], grid[1], image_hw[0], image_hw[1])  # (L, 2) float64
    if alphas.size(-1) != centres.size(0):
        raise ValueError(f"attention over {alphas.size(-1)} cells does not match a {grid[0]}x{grid[1]} grid")
    peak = alphas[:, -1].argmax(dim=-1).cpu()  # (N,) the last glimpse decides
    boxes = boxes.detach().cpu().double()
    hit = inside_boxes(centres[peak], boxes)  # (N,)
    chance = inside_boxes(centres.unsqueeze(0), boxes.unsqueeze(1)).double().mean(dim=1)  # (N,) fraction of cells in the box
    ids = [type_names.index(t) for t in LOCALISED_TYPES]
    out: dict[str, float] = {}
    for name, mask in [("", sum(types.cpu().eq(i) for i in ids).bool())] + [(f"/{t}", types.cpu().eq(type_names.index(t)))
                                                                               for t in LOCALISED_TYPES]:
        if bool(mask.any()):
            out[f"localisation{name}"] = float(hit[mask].double().mean())
            out[f"localisation{name}_chance"] = float(chance[mask].mean())
    return out
