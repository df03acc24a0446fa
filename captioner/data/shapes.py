"""The synthetic shapes world: rendered scenes with captions, object boxes and word-to-object links.

Each image shows 1-3 non-overlapping objects on a noisy grey background. An object is a
shape (circle, square, triangle, diamond) in a colour (red, green, blue, yellow, purple)
and a size class (small, large). Every image gets five reference captions, one from each
of five templates, and every caption names every object by its size, colour and shape.

Everything about a caption is a deterministic function of the layout, so a model that
looks at the right places can reproduce a reference exactly:

* Objects are put in a canonical order along the scene's main axis: left to right when
  the object centres spread wider horizontally than vertically, otherwise top to bottom.
* The relation between two neighbours in that order comes from the dominant axis of the
  displacement of their box centres: "to the left of" / "to the right of" when the
  horizontal offset is the larger one, otherwise "above" / "below".
* Layouts whose order or relations would be ambiguous (offsets within ``margin`` pixels
  of a tie; by default one cell of an 8x8 grid) are rejected and resampled, so the rule
  always has a clear visual answer.

Ground truth: ``bbox`` is ``[x0, y0, x1, y1]`` in pixels of the written image with x1 and
y1 EXCLUSIVE (the object's pixels are ``image[y0:y1, x0:x1]``; the box is tight). For each
caption, ``object_ids`` is aligned with ``tokens``: the index (into the image's
``objects``) of the object a size, colour or shape word describes, and -1 for every other
word. ``objects`` are stored in the canonical order.

The output is a Karpathy-split JSON (``dataset_shapes.json``) plus PNG files, so the
generic loader reads it as it reads COCO. Each image is generated from its own
``numpy.random.Generator`` seeded with ``(seed, split, index)``: the same arguments give
byte-identical files, whatever order (or subset) the images are made in.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from captioner.data.tokenize import tokenize
from captioner.utils import atomic_write_text

logger = logging.getLogger(__name__)

# Bump when anything that changes the generated files changes, so old caches are rebuilt.
FORMAT_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Saturated colours far from each other and from the grey background, so colour stays
# unambiguous after per-object jitter and sensor noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 175, 65),
    "blue": (50, 90, 235),
    "yellow": (240, 210, 45),
    "purple": (155, 60, 210),
}
# Side of the (square) object box as a fraction of image_size, inclusive range. At 64 px
# this is 14-18 px (small) and 24-28 px (large): the gap between classes is much larger
# than the spread within one, and even a small box spans more than one cell of an 8x8 grid.
SIZES: dict[str, tuple[float, float]] = {"small": (0.22, 0.28), "large": (0.38, 0.44)}
TEMPLATES: tuple[str, ...] = ("chain", "there_is", "middle", "count", "image_shows")
SPLITS: tuple[str, ...] = ("train", "val", "test")
JSON_NAME = "dataset_shapes.json"
IMAGE_DIR = "images"
MAX_OBJECTS = 3  # the templates are written for 1-3 objects

_GAP = 2  # least number of background pixels between two boxes
_BACKGROUND_RANGE = (100, 140)  # mean grey level of the background
_BACKGROUND_TINT = 8  # per-channel offset so the background is grey-ish, not exactly grey
_COLOR_JITTER = 12  # per-channel, per-object offset
_COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
_AXIS_WORDS = {"x": "from left to right", "y": "from top to bottom"}
# Relation of X relative to Y, by template style. "there is" uses shorter wording so the
# templates differ in more than word order.
_RELATIONS = {
    "long": {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"},
    "short": {"left": "left of", "right": "right of", "above": "over", "below": "under"},
}
_PUNCT = frozenset({",", ":"})  # the only punctuation inside captions (the final period is added by _render_text)
_OUR_FILES = re.compile(r"^(train|val|test)_\d{6}\.png$")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; ``bbox`` is [x0, y0, x1, y1] in pixels, x1/y1 exclusive."""

    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box in pixels (x, y)."""
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def words(self) -> list[str]:
        """The three describing words, in caption order."""
        return [self.size, self.color, self.shape]

    def to_json(self) -> dict:
        """Plain-dict form for the dataset JSON."""
        return {"shape": self.shape, "color": self.color, "size": self.size, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Caption:
    """One reference caption: raw text, its tokens, and the object each token describes (-1: none)."""

    raw: str
    tokens: list[str]
    object_ids: list[int]
    template: int


def size_range_px(size: str, image_size: int) -> tuple[int, int]:
    """Inclusive range of box sides, in pixels, for a size class at ``image_size``."""
    lo, hi = SIZES[size]
    return max(3, round(lo * image_size)), max(3, round(hi * image_size))


def default_margin(image_size: int) -> int:
    """Smallest offset, in pixels, that separates two readings of a layout: one cell of an 8x8 grid."""
    # A model reads positions off an 8x8 attention grid; with ties at least a cell away it
    # can get order and relations right, so errors measure the model, not label noise.
    return max(2, round(image_size / 8))


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``: left/right when the horizontal offset dominates, else above/below."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def main_axis(objects: Sequence[SceneObject]) -> str:
    """'x' when the object centres spread at least as wide horizontally as vertically, else 'y'."""
    xs = [o.center[0] for o in objects]
    ys = [o.center[1] for o in objects]
    return "x" if max(xs) - min(xs) >= max(ys) - min(ys) else "y"


def canonical_order(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """Objects sorted along the main axis (left to right, or top to bottom)."""
    if len(objects) < 2:
        return list(objects)
    k = 0 if main_axis(objects) == "x" else 1
    return sorted(objects, key=lambda o: o.center[k])


def is_unambiguous(objects: Sequence[SceneObject], margin: float) -> bool:
    """Whether the canonical order and every neighbour relation hold with at least ``margin`` px to spare."""
    if len(objects) < 2:
        return True
    xs = [o.center[0] for o in objects]
    ys = [o.center[1] for o in objects]
    spread_x, spread_y = max(xs) - min(xs), max(ys) - min(ys)
    if abs(spread_x - spread_y) < margin:
        return False
    ordered = canonical_order(objects)
    k = 0 if spread_x >= spread_y else 1
    for a, b in zip(ordered, ordered[1:]):
        if b.center[k] - a.center[k] < margin:
            return False
        dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
        if abs(abs(dx) - abs(dy)) < margin:
            return False
    return True


def sample_layout(
    rng: np.random.Generator,
    image_size: int,
    n_objects: int,
    gap: int = _GAP,
    margin: float | None = None,
    max_tries: int = 100_000,
) -> list[SceneObject]:
    """Draw ``n_objects`` distinct objects at random non-overlapping positions, in canonical order.

    Boxes keep ``gap`` pixels between them; layouts that ``is_unambiguous`` rejects are redrawn.
    """
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [1, {MAX_OBJECTS}], got {n_objects}")
    margin = default_margin(image_size) if margin is None else margin
    sizes, colors = list(SIZES), list(COLORS)
    n_kinds = len(SHAPES) * len(colors) * len(sizes)
    bounds = np.array([size_range_px(s, image_size) for s in sizes])  # (n_sizes, 2) inclusive
    if bounds.max() > image_size:
        raise ValueError(f"image_size {image_size} is too small for the object sizes")
    # Rejection sampling in batches of candidate layouts: most 3-object draws overlap, and a
    # Python loop over single draws would dominate the generation time.
    batch = 32
    for _ in range(0, max_tries, batch):
        kinds = rng.integers(0, n_kinds, size=(batch, n_objects))  # (B, n)
        u = rng.random((batch, n_objects, 3))  # (B, n, 3): side, x0, y0
        size_i = kinds % len(sizes)
        lo, hi = bounds[size_i, 0], bounds[size_i, 1]  # (B, n)
        side = lo + np.floor(u[..., 0] * (hi - lo + 1)).astype(np.int64)
        x0 = np.floor(u[..., 1] * (image_size - side + 1)).astype(np.int64)
        y0 = np.floor(u[..., 2] * (image_size - side + 1)).astype(np.int64)
        x1, y1 = x0 + side, y0 + side
        ok = np.ones(batch, dtype=bool)
        for i in range(n_objects):
            for j in range(i + 1, n_objects):
                # Distinct (shape, colour, size) triples, so "the small red circle" names one object.
                ok &= kinds[:, i] != kinds[:, j]
                ok &= ~(
                    (x0[:, i] < x1[:, j] + gap)
                    & (x0[:, j] < x1[:, i] + gap)
                    & (y0[:, i] < y1[:, j] + gap)
                    & (y0[:, j] < y1[:, i] + gap)
                )
        for b in np.flatnonzero(ok):
            objects = []
            for i in range(n_objects):
                shape_i, rest = divmod(int(kinds[b, i]), len(colors) * len(sizes))
                color_i, s_i = divmod(rest, len(sizes))
                box = (int(x0[b, i]), int(y0[b, i]), int(x1[b, i]), int(y1[b, i]))
                objects.append(SceneObject(SHAPES[shape_i], colors[color_i], sizes[s_i], box))
            if is_unambiguous(objects, margin):
                return canonical_order(objects)
    raise RuntimeError(f"no valid layout of {n_objects} objects in {max_tries} tries at image_size {image_size}")


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of ``shape`` filling its box: it touches all four box edges."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    last = side - 1  # PIL's coordinates are inclusive
    if shape == "circle":
        draw.ellipse([0, 0, last, last], fill=1)
    elif shape == "square":
        draw.rectangle([0, 0, last, last], fill=1)
    elif shape == "triangle":
        draw.polygon([(0, last), (last, last), (last / 2, 0)], fill=1)
    elif shape == "diamond":
        draw.polygon([(last / 2, 0), (last, last / 2), (last / 2, last), (0, last / 2)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(img, dtype=bool)
    mask.setflags(write=False)  # shared by the cache
    return mask


def render_scene(
    rng: np.random.Generator, objects: Sequence[SceneObject], image_size: int, noise: float = 6.0
) -> np.ndarray:
    """Paint ``objects`` on a grey-ish background with gaussian noise (std ``noise`` in 0-255 units); (H, W, 3) uint8."""
    grey = rng.integers(_BACKGROUND_RANGE[0], _BACKGROUND_RANGE[1] + 1)
    tint = rng.integers(-_BACKGROUND_TINT, _BACKGROUND_TINT + 1, size=3)
    image = np.empty((image_size, image_size, 3), dtype=np.float32)  # (H, W, 3)
    image[:] = grey + tint
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox
        mask = shape_mask(obj.shape, x1 - x0)  # (side, side)
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        color = np.asarray(COLORS[obj.color], dtype=np.float32) + jitter  # (3,)
        image[y0:y1, x0:x1][mask] = color
    if noise > 0:
        image += noise * rng.standard_normal(size=image.shape, dtype=np.float32)
    image += 0.5  # round half up: the cast below truncates, and the values are non-negative after clipping
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def _mention(obj_id: int, obj: SceneObject) -> list[tuple[str, int]]:
    """'a <size> <colour> <shape>' as (word, object id) pieces."""
    return [("a", -1)] + [(w, obj_id) for w in obj.words()]


def _words(text: str) -> list[tuple[str, int]]:
    return [(w, -1) for w in text.split()]


def _join_list(mentions: list[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """'A', 'A and B', 'A, B and C'."""
    out: list[tuple[str, int]] = []
    for i, m in enumerate(mentions):
        if i > 0:
            out += [("and", -1)] if i == len(mentions) - 1 else [(",", -1)]
        out += m
    return out


def _template_pieces(template: int, objects: Sequence[SceneObject]) -> list[tuple[str, int]]:
    """The caption of ``template`` as (word or punctuation, object id) pieces; ``objects`` in canonical order."""
    n = len(objects)
    m = [_mention(i, o) for i, o in enumerate(objects)]

    def rel(a: int, b: int, style: str = "long") -> list[tuple[str, int]]:
        return _words(_RELATIONS[style][relation(objects[a], objects[b])])

    name = TEMPLATES[template]
    if name == "chain":  # a A left of a B, which is above a C
        if n == 1:
            return m[0]
        out = m[0] + rel(0, 1) + m[1]
        if n == 3:
            out += [(",", -1)] + _words("which is") + rel(1, 2) + m[2]
        return out
    if name == "there_is":  # there is a C right of a B, which is under a A (reverse order)
        out = _words("there is") + m[n - 1]
        if n >= 2:
            out += rel(n - 1, n - 2, "short") + m[n - 2]
        if n == 3:
            out += [(",", -1)] + _words("which is") + rel(1, 0, "short") + m[0]
        return out
    if name == "middle":  # a B is right of a A and left of a C
        if n == 1:
            return m[0] + _words("is in the picture")
        out = m[1] + _words("is") + rel(1, 0) + m[0]
        if n == 3:
            out += _words("and") + rel(1, 2) + m[2]
        return out
    if name == "count":  # three shapes: a A, a B and a C
        return _words(_COUNT_WORDS[n]) + [(":", -1)] + _join_list(m)
    if name == "image_shows":  # the image shows a A, a B and a C from left to right
        out = _words("the image shows") + _join_list(m)
        if n >= 2:
            out += _words(_AXIS_WORDS[main_axis(objects)])
        return out
    raise ValueError(f"unknown template {template}")


_PLACEHOLDER = "thing"  # stands for object words in skeletons; a single letter would read as an initial ("x.")


@lru_cache(maxsize=None)
def _check_skeleton(skeleton: tuple[str, ...]) -> None:
    """Assert that the tokenizer splits a caption skeleton (object words as _PLACEHOLDER) into its words."""
    expected = [w for w in skeleton if w not in _PUNCT]
    got = tokenize(_render_text(skeleton))
    if got != expected:
        raise AssertionError(f"tokenize({_render_text(skeleton)!r}) = {got}, expected {expected}")
    _check_object_words()


@lru_cache(maxsize=1)
def _check_object_words() -> None:
    """Assert that the words _PLACEHOLDER stands for are single tokens, mid-sentence and before the period."""
    for word in (*SIZES, *COLORS, *SHAPES):
        if tokenize(f"A {word} {word}.") != ["a", word, word]:
            raise AssertionError(f"the tokenizer splits or changes {word!r}")


def _render_text(words: Sequence[str]) -> str:
    """Join words into an English sentence: capitalised, punctuation attached, final period."""
    text = ""
    for word in words:
        text += word if (not text or word in _PUNCT) else " " + word
    return text[:1].upper() + text[1:] + "."


def describe_scene(objects: Sequence[SceneObject]) -> list[Caption]:
    """The five reference captions of a scene, one per template; ``objects`` in canonical order."""
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"scenes have 1-{MAX_OBJECTS} objects, got {len(objects)}")
    captions = []
    for t in range(len(TEMPLATES)):
        pieces = _template_pieces(t, objects)
        raw = _render_text([w for w, _ in pieces])
        words = [(w, i) for w, i in pieces if w not in _PUNCT]
        # The PTB tokenizer costs ~0.15 ms a call, a third of the generation time if run on
        # every caption. Size, colour and shape words are plain lower-case words that it
        # neither splits nor merges, so tokenizing the caption with them replaced by one
        # placeholder checks the same thing, and the cache holds the few hundred distinct
        # skeletons. The tests compare tokens with tokenize(raw) on whole datasets.
        _check_skeleton(tuple(_PLACEHOLDER if i >= 0 else w for w, i in pieces))
        captions.append(Caption(raw=raw, tokens=[w for w, _ in words], object_ids=[i for _, i in words], template=t))
    return captions


def make_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    noise: float = 6.0,
) -> tuple[np.ndarray, list[SceneObject], list[Caption]]:
    """One random scene: image (H, W, 3) uint8, objects in canonical order, five captions."""
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    objects = sample_layout(rng, image_size, n_objects)
    image = render_scene(rng, objects, image_size, noise)
    return image, objects, describe_scene(objects)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: depends only on (seed, split, index), so generation order does not matter."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def shapes_meta(
    n_train: int, n_val: int, n_test: int, image_size: int, seed: int, min_objects: int, max_objects: int, noise: float
) -> dict:
    """Everything that determines the generated files; equal meta means the files can be reused."""
    return {
        "version": FORMAT_VERSION,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "image_size": int(image_size),
        "seed": int(seed),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "noise": float(noise),
        "shapes": list(SHAPES),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes_px": {k: list(size_range_px(k, image_size)) for k in SIZES},
        "gap_px": _GAP,
        "margin_px": default_margin(image_size),
        "background_range": list(_BACKGROUND_RANGE),
        "color_jitter": _COLOR_JITTER,
        "templates": list(TEMPLATES),
        "bbox_format": "[x0, y0, x1, y1] pixels, x1 and y1 exclusive",
        "object_ids": "per token: index into objects of the object a size/colour/shape word describes, else -1",
    }


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG: no row filter, zlib level 1, no metadata (so byte-stable)."""
    # Pillow's encoder tries every row filter on every row; on these noisy images that buys
    # ~5% in size for twice the time, and PNG writing was the largest cost of generation.
    height, width, _ = image.shape
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # (H, 1 + 3W): filter byte 0 ("None") per row
    rows[:, 1:] = image.reshape(height, 3 * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def _read_meta(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("meta")
    except (OSError, ValueError, AttributeError):
        return None


def generate_shapes(
    root: str | Path,
    n_train: int = 8000,
    n_val: int = 1000,
    n_test: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    noise: float = 6.0,
) -> Path:
    """Write the shapes dataset under ``root`` (reusing it when its meta matches) and return the JSON path."""
    if min(n_train, n_val, n_test) < 0:
        raise ValueError("split sizes must be non-negative")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    root = Path(root)
    json_path = root / JSON_NAME
    # Round-trip through JSON so tuples and lists compare equal to what was read back.
    meta = json.loads(json.dumps(shapes_meta(n_train, n_val, n_test, image_size, seed, min_objects, max_objects, noise)))
    if json_path.exists() and _read_meta(json_path) == meta:
        logger.info("reusing shapes dataset at %s", json_path)
        return json_path

    start = time.perf_counter()
    image_dir = root / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    # The JSON marks a complete dataset: drop a stale one before touching the images, so an
    # interrupted run can never leave a JSON that describes images it did not write.
    json_path.unlink(missing_ok=True)
    images: list[dict] = []
    written: set[str] = set()
    for split, count in zip(SPLITS, (n_train, n_val, n_test)):
        for index in range(count):
            image, objects, captions = make_scene(scene_rng(seed, split, index), image_size, min_objects, max_objects, noise)
            filename = f"{split}_{index:06d}.png"
            (image_dir / filename).write_bytes(png_bytes(image))
            written.add(filename)
            imgid = len(images)
            sentids = [imgid * len(TEMPLATES) + k for k in range(len(captions))]
            images.append(
                {
                    "filename": filename,
                    "filepath": IMAGE_DIR,
                    "imgid": imgid,
                    "split": split,
                    "sentids": sentids,
                    "sentences": [
                        {
                            "raw": c.raw,
                            "tokens": c.tokens,
                            "imgid": imgid,
                            "sentid": sid,
                            "object_ids": c.object_ids,
                            "template": c.template,
                        }
                        for c, sid in zip(captions, sentids)
                    ],
                    "objects": [o.to_json() for o in objects],
                }
            )
    # Images left over from an earlier, larger dataset would otherwise sit beside the new ones.
    for stale in image_dir.iterdir():
        if _OUR_FILES.match(stale.name) and stale.name not in written:
            stale.unlink()

    # json.dumps uses the C encoder; json.dump streams through the pure-Python one (10x slower).
    atomic_write_text(json_path, json.dumps({"dataset": "shapes", "meta": meta, "images": images}, separators=(",", ":")))
    logger.info("wrote %d shapes images to %s in %.1f s", len(images), root, time.perf_counter() - start)
    return json_path
