"""Attention localisation on data with object boxes (the shapes world).

Under teacher forcing on the reference captions, the attention peak (argmax location, mapped to the
centre of its grid cell in image coordinates) is checked against the box of the object a word
describes. *Per word*: the fraction of describing words whose peak lies in their object's box.
*Per mention*: the fraction of object mentions (the words of one caption that describe one object,
e.g. "small red circle") for which the peak lies in the box at one or more of those words.
Chance levels are what a uniformly random peak would score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def cell_centres(grid_h: int, grid_w: int, image_h: float, image_w: float) -> Tensor:
    """(L, 2) x, y centres of the grid cells in image pixels, row-major like the flattened features."""
    ys = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * image_h / grid_h
    xs = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * image_w / grid_w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (L, 2)


def _inside(centres: Tensor, box: Sequence[float]) -> Tensor:
    x0, y0, x1, y1 = box
    return (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)  # (L,)


def localisation_scores(
    alphas: Sequence[Tensor],
    object_ids: Sequence[Sequence[int]],
    boxes: Sequence[Sequence[Sequence[float]]],
    grid: tuple[int, int],
    image_hw: tuple[float, float],
) -> dict[str, float]:
    """Score attention maps against boxes.

    ``alphas[k]``: (T_k, L) attention at the steps emitting the tokens of caption k; ``object_ids[k]``:
    per token, the index of the described object in ``boxes[k]`` or -1.
    """
    centres = cell_centres(grid[0], grid[1], image_hw[0], image_hw[1])
    words = word_hits = 0
    word_chance = 0.0
    mentions = mention_hits = 0
    mention_chance = 0.0
    for alpha, ids, bxs in zip(alphas, object_ids, boxes):
        peaks = alpha.argmax(-1).tolist()  # (T,)
        by_object: dict[int, list[bool]] = {}
        for t, obj in enumerate(ids):
            if obj < 0 or t >= len(peaks):
                continue
            inside = _inside(centres, bxs[obj])
            hit = bool(inside[peaks[t]])
            by_object.setdefault(obj, []).append(hit)
            words += 1
            word_hits += hit
            word_chance += float(inside.double().mean())
        for obj, hits in by_object.items():
            p = float(_inside(centres, bxs[obj]).double().mean())
            mentions += 1
            mention_hits += any(hits)
            mention_chance += 1.0 - (1.0 - p) ** len(hits)  # at least one of k uniform peaks lands inside
    return {
        "attention_localisation": mention_hits / max(mentions, 1),
        "attention_localisation_per_word": word_hits / max(words, 1),
        "attention_localisation_chance": mention_chance / max(mentions, 1),
        "attention_localisation_per_word_chance": word_chance / max(words, 1),
        "attention_mentions": float(mentions),
        "attention_words": float(words),
    }
