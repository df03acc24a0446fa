"""Readers for caption dataset formats, all producing the same ``ImageRecord`` list.

Formats:
  * Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
    and the shapes world's ``dataset_shapes.json``)
  * the Flickr8k text layout (``Flickr8k.token.txt`` plus ``Flickr_8k.{train,dev,test}Images.txt``)
  * COCO caption annotation JSON (``captions_train2014.json``) plus an image directory
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.data.tokenize import tokenize

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass
class ImageRecord:
    """One image with its reference captions (raw and tokenised) and its split."""

    image_id: str
    path: Path
    split: str
    captions: list[str]
    tokens: list[list[str]]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. shapes-world objects and word links


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _normalise_split(split: str, restval_as: str) -> str:
    split = {"dev": "val", "restval": restval_as}.get(split, split)
    return split


def read_karpathy_json(path: str | Path, image_root: str | Path | None = None, restval_as: str = "train") -> list[ImageRecord]:
    """Read a Karpathy split JSON; images resolve to ``image_root/filepath/filename``.

    ``image_root`` defaults to the JSON's folder. ``restval`` images (COCO) join ``restval_as``.
    Pre-tokenised ``tokens`` in the file are ignored in favour of our tokenizer on ``raw`` so that
    training text and metrics see identical tokens.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(path, 'expected a JSON object with an "images" list (Karpathy split format)')
    records = []
    for n, img in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(img, dict):
            raise DatasetError(path, f"{where} is not an object")
        for key in ("filename", "split", "sentences"):
            if key not in img:
                raise DatasetError(path, f'{where} has no "{key}" field')
        if not isinstance(img["sentences"], list) or not img["sentences"]:
            raise DatasetError(path, f"{where} ({img['filename']}) has no sentences")
        captions = []
        for k, s in enumerate(img["sentences"]):
            if isinstance(s, dict) and isinstance(s.get("raw"), str):
                captions.append(s["raw"])
            elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
                captions.append(" ".join(map(str, s["tokens"])))
            else:
                raise DatasetError(path, f'{where}.sentences[{k}] has neither "raw" text nor "tokens"')
        image_path = root / img.get("filepath", "") / img["filename"]
        image_id = str(img.get("cocoid", img.get("imgid", img["filename"])))
        extra = {}
        if "objects" in img:
            extra["objects"] = img["objects"]
            extra["object_ids"] = [s.get("object_ids") for s in img["sentences"]]
        records.append(
            ImageRecord(
                image_id=image_id,
                path=image_path,
                split=_normalise_split(str(img["split"]), restval_as),
                captions=captions,
                tokens=[tokenize(c) for c in captions],
                extra=extra,
            )
        )
    if not records:
        raise DatasetError(path, "the images list is empty")
    return records


_TOKEN_LINE = re.compile(r"^(?P<image>[^#\s]+)#(?P<idx>\d+)\s+(?P<caption>.*)$")


def read_flickr8k_text(root: str | Path, image_dir: str = "Flicker8k_Dataset", text_dir: str = "Flickr8k_text") -> list[ImageRecord]:
    """Read the Flickr8k distribution layout: token file, split files and the photo folder.

    Lines whose id and caption are separated by a space instead of a tab are accepted. Captions of
    photos that do not exist and photos in no split are reported once (a warning) and skipped.
    """
    root = Path(root)
    text = root / text_dir
    token_file = text / "Flickr8k.token.txt"
    images = root / image_dir
    if not token_file.is_file():
        raise DatasetError(token_file, "file not found (expected the Flickr8k text layout under data.root)")
    if not images.is_dir():
        raise DatasetError(images, "image folder not found")
    captions: dict[str, list[str]] = {}
    with token_file.open("r", encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            m = _TOKEN_LINE.match(line)
            if m is None:
                raise DatasetError(token_file, f'line {lineno} is not "<image>#<n><TAB><caption>": {line[:80]!r}')
            captions.setdefault(m["image"], []).append(m["caption"].strip())
    split_of: dict[str, str] = {}
    for split, name in (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"), ("test", "Flickr_8k.testImages.txt")):
        split_file = text / name
        if not split_file.is_file():
            raise DatasetError(split_file, "split file not found")
        for line in split_file.read_text(encoding="utf-8").split():
            split_of[line.strip()] = split
    on_disk = {p.name for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    no_photo = sorted(set(captions) - on_disk)
    no_split = sorted(on_disk - set(split_of))
    no_caption = sorted(set(split_of) - set(captions))
    if no_photo:
        log.warning("%s: %d captioned image(s) have no photo in %s, skipped (e.g. %s)", token_file, len(no_photo), images, no_photo[0])
    if no_split:
        log.warning("%s: %d photo(s) are in no split, skipped (e.g. %s)", images, len(no_split), no_split[0])
    if no_caption:
        log.warning("%s: %d image(s) in a split have no caption, skipped (e.g. %s)", text, len(no_caption), no_caption[0])
    records = []
    for name in sorted(split_of):
        if name not in captions or name not in on_disk:
            continue
        caps = captions[name]
        records.append(ImageRecord(name, images / name, split_of[name], caps, [tokenize(c) for c in caps]))
    if not records:
        raise DatasetError(token_file, "no image has captions, a photo and a split")
    return records


def read_coco_captions(annotation_files: dict[str, str | Path], image_dirs: dict[str, str | Path]) -> list[ImageRecord]:
    """Read COCO caption annotation JSON files, one per split (``{"train": ..., "val": ...}``)."""
    records = []
    for split, ann in annotation_files.items():
        ann = Path(ann)
        data = _load_json(ann)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise DatasetError(ann, 'expected a COCO captions object with "images" and "annotations"')
        files = {}
        for n, img in enumerate(data["images"]):
            try:
                files[img["id"]] = img["file_name"]
            except (KeyError, TypeError):
                raise DatasetError(ann, f'images[{n}] needs "id" and "file_name"') from None
        caps: dict[Any, list[str]] = {}
        for n, a in enumerate(data["annotations"]):
            try:
                caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
            except (KeyError, TypeError):
                raise DatasetError(ann, f'annotations[{n}] needs "image_id" and "caption"') from None
        orphans = sorted(set(caps) - set(files), key=str)
        if orphans:
            log.warning("%s: %d caption(s) refer to unknown image ids, skipped (e.g. %s)", ann, len(orphans), orphans[0])
        uncaptioned = [i for i in files if i not in caps]
        if uncaptioned:
            log.warning("%s: %d image(s) have no caption, skipped", ann, len(uncaptioned))
        root = Path(image_dirs[split])
        for img_id, fname in files.items():
            if img_id in caps:
                c = caps[img_id]
                records.append(ImageRecord(str(img_id), root / fname, _normalise_split(split, "train"), c, [tokenize(x) for x in c]))
    return records


def read_records(fmt: str, root: str | Path, annotations: str | None = None, image_root: str | None = None) -> list[ImageRecord]:
    """Dispatch on the dataset format name used in the ``data`` config group."""
    root = Path(root)
    if fmt == "karpathy":
        if annotations is None:
            raise ValueError("data.annotations must name the Karpathy JSON file for format=karpathy")
        ann = Path(annotations) if Path(annotations).is_absolute() else root / annotations
        return read_karpathy_json(ann, Path(image_root) if image_root else root)
    if fmt == "flickr8k":
        return read_flickr8k_text(root)
    if fmt == "coco":
        splits = {"train": "annotations/captions_train2014.json", "val": "annotations/captions_val2014.json"}
        dirs = {"train": root / "train2014", "val": root / "val2014"}
        return read_coco_captions({k: root / v for k, v in splits.items()}, dirs)
    raise ValueError(f"unknown dataset format {fmt!r}; expected karpathy, flickr8k or coco")
