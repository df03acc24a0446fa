"""Data assembly for a job: records per split, the vocabulary, and image (or cached feature) stores.

Nothing here imports models or training: a feature cache is opened against a plain spec dict
(``captioner.models.encoder.feature_spec``) that the model side builds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.config import ConfigError, DataConfig
from captioner.data.datasets import ImageStore
from captioner.data.sources import ImageRecord, read_records
from captioner.data.vocab import Vocabulary


@dataclass
class DataBundle:
    """Records per split, the vocabulary and the image (or feature) stores."""

    records: dict[str, list[ImageRecord]]
    vocab: Vocabulary
    stores: dict[str, Any]

    def split(self, name: str) -> "SplitData":
        """One split's records and store (ConfigError naming the splits there are if it is empty)."""
        recs = self.records.get(name)
        if not recs or name not in self.stores:
            have = ", ".join(s for s, r in self.records.items() if r)
            raise ConfigError(f"split={name}: the data has no images in that split (it has: {have})")
        return SplitData(name, recs, self.stores[name])


@dataclass
class SplitData:
    """The images of one split, in order: records (with references) and the store their inputs come from."""

    name: str
    records: list[ImageRecord]
    store: Any  # ImageStore (uint8 images) or FeatureStore (cached features): len() and [i]

    def references(self) -> dict[str, list[str]]:
        """Raw reference captions by image id."""
        return references(self.records)


def load_records(cfg: DataConfig) -> dict[str, list[ImageRecord]]:
    """Read (and for the shapes world, generate if asked) the dataset; records grouped by split."""
    root = Path(cfg.root).expanduser()
    if cfg.generate and cfg.name == "shapes":
        from captioner.data.shapes import generate_shapes

        s = cfg.shapes
        generate_shapes(root, n_train=s.n_train, n_val=s.n_val, n_test=s.n_test, image_size=s.image_size,
                        seed=s.seed, min_objects=s.min_objects, max_objects=s.max_objects)
    records = read_records(cfg.format, root, cfg.annotations, cfg.image_root)
    by_split: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        if r.split in by_split:
            by_split[r.split].append(r)
    for split, limit in (("train", cfg.limit_train), ("val", cfg.limit_val), ("test", cfg.limit_test)):
        if limit is not None:
            by_split[split] = by_split[split][:limit]
    if not by_split["train"]:
        raise ValueError(f"{root}: the dataset has no training images")
    return by_split


def build_data(cfg: DataConfig, vocab: Vocabulary | None = None, progress: bool = False,
               feature_spec: Mapping[str, Any] | None = None) -> DataBundle:
    """Records, vocabulary (built from the training captions unless given) and stores.

    Without ``cfg.features`` the stores read images. With it, they read the feature cache, checked
    against ``feature_spec`` (what the model's frozen encoder would compute: a cache made with another
    encoder, weights, grid or transform is refused); without a spec the stores are left empty, to be
    opened later with :func:`open_feature_stores` (e.g. once the cache has been built).
    """
    records = load_records(cfg)
    if vocab is None:
        vocab = Vocabulary.build((t for r in records["train"] for t in r.tokens), min_count=cfg.min_word_count)
    data = DataBundle(records, vocab, {})
    if not cfg.features:
        data.stores = {s: ImageStore(rs, cfg.image_size, preload=cfg.preload, progress=progress) for s, rs in records.items() if rs}
    elif feature_spec is not None:
        data.stores = open_feature_stores(cfg, records, feature_spec)
    return data


MIRRORED = "train_mirrored"  # the cache split holding the features of the mirrored training photos (data.hflip)


def mirrored_id(image_id: str) -> str:
    """The cache id of a training image's mirrored copy."""
    return f"{image_id}#mirrored"


def open_feature_stores(cfg: DataConfig, records: Mapping[str, Sequence[ImageRecord]],
                        feature_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Open the feature cache ``cfg.features`` for every split, checked against ``feature_spec``."""
    from captioner.data.features import open_cache

    stores = {s: open_cache(cfg.features, feature_spec, [r.image_id for r in rs], data_name=cfg.name) for s, rs in records.items() if rs}
    if cfg.hflip and records.get("train"):  # the features of the mirrored training photos (prepare with data.hflip=true)
        stores[MIRRORED] = open_cache(cfg.features, feature_spec, [mirrored_id(r.image_id) for r in records["train"]],
                                      data_name=cfg.name, hflip=True)
    return stores


def references(records: Sequence[ImageRecord]) -> dict[str, list[str]]:
    """Raw reference captions by image id."""
    return {r.image_id: list(r.captions) for r in records}
