"""Tests of the synthetic shapes world: determinism, schema, captions, boxes and word-to-object links."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli import shapes as shapes_cli
from captioner.data import shapes
from captioner.data.shapes import generate_shapes
from captioner.data.tokenize import tokenize

SMALL = dict(n_train=20, n_val=5, n_test=5)
ATTRIBUTE_WORDS = {*shapes.SHAPES, *shapes.COLORS, *shapes.SIZES}
# Relation phrases, read independently of the generator: direction of the subject relative to the object.
RELATION_PHRASES = {
    "to the left of": "left",
    "left of": "left",
    "to the right of": "right",
    "right of": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny generated dataset (20/5/5 images) and its parsed JSON."""
    path = generate_shapes(tmp_path_factory.mktemp("shapes"), seed=3, **SMALL)
    return path, json.loads(path.read_text())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mentions(sentence: dict) -> list[tuple[int, int, int]]:
    """(start, end, object id) of each run of tokens linked to one object."""
    ids = sentence["object_ids"]
    spans, i = [], 0
    while i < len(ids):
        if ids[i] < 0:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        spans.append((i, j, ids[i]))
        i = j
    return spans


def _center(obj: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _holds(direction: str, subject: dict, other: dict) -> bool:
    """Whether ``subject`` is ``direction`` of ``other``, on the dominant axis of their offset."""
    (sx, sy), (ox, oy) = _center(subject), _center(other)
    dx, dy = sx - ox, sy - oy
    horizontal = abs(dx) >= abs(dy)
    return {
        "left": horizontal and dx < 0,
        "right": horizontal and dx > 0,
        "above": not horizontal and dy < 0,
        "below": not horizontal and dy > 0,
    }[direction]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", seed=7, **SMALL).parent
    b = generate_shapes(tmp_path / "b", seed=7, **SMALL).parent
    c = generate_shapes(tmp_path / "c", seed=8, **SMALL).parent
    files_a, files_b, files_c = _all_files(a), _all_files(b), _all_files(c)
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    differing = [k for k in files_a if files_a[k] != files_c[k]]
    assert len(differing) == len(files_a)  # every image and the JSON change with the seed


def test_images_depend_only_on_seed_split_and_index(tmp_path: Path) -> None:
    """Each image has its own generator, so split sizes and generation order change nothing."""
    big = _all_files(generate_shapes(tmp_path / "big", seed=1, **SMALL).parent)
    small = _all_files(generate_shapes(tmp_path / "small", seed=1, n_train=4, n_val=2, n_test=0).parent)
    images = [k for k in small if k.endswith(".png")]
    assert len(images) == 6
    assert all(small[k] == big[k] for k in images)
    image, _, _ = shapes.make_scene(shapes.scene_rng(1, "val", 3))
    assert shapes.png_bytes(image) == big["images/val_000003.png"]


def test_schema(dataset: tuple[Path, dict]) -> None:
    path, data = dataset
    assert path.name == "dataset_shapes.json" and data["dataset"] == "shapes"
    meta = data["meta"]
    assert meta["version"] == shapes.FORMAT_VERSION and meta["seed"] == 3 and meta["image_size"] == 64
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    assert [im["imgid"] for im in images] == list(range(len(images)))
    sentids = [sid for im in images for sid in im["sentids"]]
    assert len(set(sentids)) == len(sentids)
    for im in images:
        assert set(im) == {"filename", "filepath", "imgid", "split", "sentids", "sentences", "objects"}
        file = path.parent / im["filepath"] / im["filename"]
        with Image.open(file) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
        assert im["filename"].startswith(im["split"] + "_")
        assert len(im["sentences"]) == 5 and [s["sentid"] for s in im["sentences"]] == im["sentids"]
        assert 1 <= len(im["objects"]) <= 3
        for obj in im["objects"]:
            assert set(obj) == {"shape", "color", "size", "bbox"}
            assert obj["shape"] in shapes.SHAPES and obj["color"] in shapes.COLORS and obj["size"] in shapes.SIZES
            assert len(obj["bbox"]) == 4 and all(isinstance(v, int) for v in obj["bbox"])
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid", "object_ids", "template"}
            assert s["imgid"] == im["imgid"] and len(s["object_ids"]) == len(s["tokens"])
    assert not list(path.parent.glob("*.tmp"))


def test_tokens_are_the_tokenizer_output(dataset: tuple[Path, dict]) -> None:
    for im in dataset[1]["images"]:
        for s in im["sentences"]:
            assert s["tokens"] == tokenize(s["raw"]), s["raw"]


def test_five_distinct_templates_per_image(dataset: tuple[Path, dict]) -> None:
    counts = set()
    for im in dataset[1]["images"]:
        counts.add(len(im["objects"]))
        assert sorted(s["template"] for s in im["sentences"]) == list(range(len(shapes.TEMPLATES)))
        assert len({s["raw"] for s in im["sentences"]}) == 5
        assert all(len(s["tokens"]) <= 25 for s in im["sentences"])
    assert counts == {1, 2, 3}


def test_every_object_named_by_linked_size_colour_shape(dataset: tuple[Path, dict]) -> None:
    for im in dataset[1]["images"]:
        objects = im["objects"]
        for s in im["sentences"]:
            spans = _mentions(s)
            assert {k for _, _, k in spans} == set(range(len(objects))), s["raw"]
            for start, end, k in spans:
                obj = objects[k]
                assert s["tokens"][start:end] == [obj["size"], obj["color"], obj["shape"]], s["raw"]
            # Describing words carry an id and nothing else does.
            for token, k in zip(s["tokens"], s["object_ids"]):
                assert (token in ATTRIBUTE_WORDS) == (k >= 0), s["raw"]


def test_relation_and_order_words_are_true(dataset: tuple[Path, dict]) -> None:
    checked = 0
    for im in dataset[1]["images"]:
        objects = im["objects"]
        for s in im["sentences"]:
            spans = _mentions(s)
            name = shapes.TEMPLATES[s["template"]]
            ids = [k for _, _, k in spans]
            if name in ("chain", "there_is", "middle"):
                for i in range(1, len(spans)):
                    between = [t for t in s["tokens"][spans[i - 1][1] : spans[i][0]] if t not in {"a", "which", "is", "and"}]
                    direction = RELATION_PHRASES[" ".join(between)]
                    # "a B is left of a A and right of a C": the first object is the subject of both.
                    subject = ids[0] if name == "middle" else ids[i - 1]
                    assert _holds(direction, objects[subject], objects[ids[i]]), s["raw"]
                    checked += 1
            else:  # count / image_shows list the objects along the main axis
                xs = [_center(objects[k])[0] for k in ids]
                ys = [_center(objects[k])[1] for k in ids]
                if "left" in s["tokens"]:
                    assert xs == sorted(xs) and max(xs) - min(xs) > max(ys) - min(ys), s["raw"]
                elif "bottom" in s["tokens"]:
                    assert ys == sorted(ys) and max(ys) - min(ys) > max(xs) - min(xs), s["raw"]
                # The list templates agree on the order.
                assert ids == [k for _, _, k in _mentions(im["sentences"][shapes.TEMPLATES.index("count")])]
    assert checked > 20


def test_boxes_are_tight_and_objects_separate(dataset: tuple[Path, dict]) -> None:
    path, data = dataset
    meta = data["meta"]
    # Pixels of an object lie within colour jitter (12) plus 4 sigma of noise of its nominal colour.
    tolerance = 12 + 4 * meta["noise"]
    fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5}
    for im in data["images"]:
        image = np.asarray(Image.open(path.parent / im["filepath"] / im["filename"])).astype(int)  # (H, W, 3)
        outside = np.ones(image.shape[:2], dtype=bool)
        boxes = [obj["bbox"] for obj in im["objects"]]
        for obj in im["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            lo, hi = meta["sizes_px"][obj["size"]]
            assert lo <= x1 - x0 <= hi and y1 - y0 == x1 - x0
            crop = image[y0:y1, x0:x1]
            near = np.abs(crop - np.asarray(shapes.COLORS[obj["color"]])).max(axis=-1) <= tolerance
            # Mostly the object's colour, as much of the box as the shape covers...
            assert near.mean() >= 0.9 * fill[obj["shape"]] and near.mean() <= fill[obj["shape"]] + 0.1
            # ...and touching every edge of the box, so the box is tight.
            assert near[0].any() and near[-1].any() and near[:, 0].any() and near[:, -1].any()
            outside[y0:y1, x0:x1] = False
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
        # Outside every box is background: grey-ish and close to its own median.
        background = image[outside]  # (N, 3)
        median = np.median(background, axis=0)
        assert np.ptp(median) <= 2 * 8 + 2 and 90 <= median.mean() <= 150
        assert (np.abs(background - median).max(axis=-1) <= 5 * meta["noise"] + 2).mean() >= 0.999


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_shape_masks_fill_their_box(shape: str) -> None:
    for side in range(8, 33):
        mask = shapes.shape_mask(shape, side)
        assert mask.shape == (side, side)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_layouts_are_unambiguous_and_ordered() -> None:
    rng = np.random.default_rng(0)
    margin = shapes.default_margin(64)
    for n in (1, 2, 3):
        for _ in range(50):
            objects = shapes.sample_layout(rng, 64, n)
            assert len(objects) == n and shapes.is_unambiguous(objects, margin)
            assert objects == shapes.canonical_order(objects)
            assert len({(o.shape, o.color, o.size) for o in objects}) == n


def test_reuse_when_meta_matches_and_regenerate_otherwise(tmp_path: Path) -> None:
    path = generate_shapes(tmp_path, **SMALL)
    image = tmp_path / "images" / "train_000019.png"
    stamps = (path.stat().st_mtime_ns, image.stat().st_mtime_ns)
    os.utime(image, ns=(1, 1))  # a rewrite would reset this
    assert generate_shapes(tmp_path, **SMALL) == path
    assert path.stat().st_mtime_ns == stamps[0] and image.stat().st_mtime_ns == 1

    # Different parameters: regenerated, and images of the old, larger split are removed.
    generate_shapes(tmp_path, n_train=10, n_val=5, n_test=5, noise=3.0)
    meta = json.loads(path.read_text())["meta"]
    assert meta["n_train"] == 10 and meta["noise"] == 3.0
    assert not image.exists() and len(list((tmp_path / "images").glob("*.png"))) == 20


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shapes_cli.main([str(tmp_path), "--n-train", "3", "--n-val", "1", "--n-test", "1", "--max-objects", "2", "--seed", "5"])
    data = json.loads((tmp_path / "dataset_shapes.json").read_text())
    assert len(data["images"]) == 5 and data["meta"]["max_objects"] == 2 and data["meta"]["seed"] == 5
    assert "dataset_shapes.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs", [dict(min_objects=0), dict(max_objects=4), dict(min_objects=3, max_objects=2), dict(n_val=-1), dict(noise=-1.0)]
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, **{**SMALL, **kwargs})
