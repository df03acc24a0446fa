"""On-disk cache of a frozen encoder's features: one memory-mapped float16 array (N, L, D) per split + a manifest.

Why this format:
  * float16 halves disk, page cache and worker-to-trainer traffic against float32 (Flickr8k at
    EfficientNet-Lite0 7x7x1280: 8,000 photos in 0.96 GB instead of 1.9 GB). Its rounding error is
    at most 2^-11 relative: the prepare job measures it on every value it writes and records it in the
    manifest (``fp16_error``). Measured on all 5.0e8 Flickr8k / Lite0 ``last`` values (in [0, 6], mean
    0.249): max abs error 1.95e-3, mean 3.76e-5 (1.5e-4 relative), while saving the same photos once
    more as JPEG (quality 90, as the dataset was made) moves the features by 1.19e-2 on average
    (``benchmarks/data.py``): 300x the rounding error. bfloat16 would keep 8 bits instead of 11 for
    no gain, as these values are nowhere near float16's range limit (65504; larger values are refused).
  * ``.npy`` files opened with ``np.load(mmap_mode="r")``: random access to one image's (L, D) block
    without reading the rest, no deserialisation, and the OS page cache is shared by every DataLoader
    worker and every run on the machine (the features are read from disk once, then from RAM).
  * ``manifest.json`` records what the features depend on (encoder name, a SHA-256 of its exact
    weights, stage, grid, image size, mean/std, the resize transform) plus the image ids of each split
    in row order. ``open_cache`` refuses a cache whose record differs from what the caller expects,
    in one message that names the cache directory and every mismatching field.
  * Every file is written under a temporary name and renamed; the manifest is written last and
    removed before any file it names is replaced, so a reader never accepts a half-written cache.
    Per-split progress files make an interrupted prepare job resume where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captioner.data.sources import DatasetError
from captioner.utils import atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE = np.float16
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# The image transform the cache was made with; bump when captioner.data.images changes what reaches the encoder.
TRANSFORM = "load_image(RGB, EXIF upright) -> PIL bicubic squash to SxS -> uint8 -> /255 -> (x - mean) / std"
# Fields of the spec compared by open_cache; "weights" (the config string) is informational, its SHA-256 decides.
COMPARED = ("encoder", "weights_sha256", "stage", "grid", "options", "image_size", "mean", "std", "transform", "precision")
DEFAULTS = {"precision": "fp32"}  # what a spec written before a compared field existed meant by leaving it out
PREPARE_SCRIPT = "python scripts/prepare_data.py"
CACHE_SUFFIXES = (".npy", ".npy.partial", ".progress.json", ".done.json", ".tmp")
LOCK = ".lock"


class FeatureCacheError(DatasetError):
    """A feature cache is missing, half-written, damaged or made for another encoder/transform/image list."""


# --------------------------------------------------------------------------------------------------
# What a cache's features depend on (the spec itself is built on the model side: captioner.models.encoder.feature_spec)
def spec_digest(spec: Mapping[str, Any]) -> str:
    """Short stable hash of the compared fields of a spec (for progress files)."""
    fields = {k: spec.get(k) for k in COMPARED if not (k in DEFAULTS and spec.get(k, DEFAULTS[k]) == DEFAULTS[k])}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def ids_digest(image_ids: Sequence[str]) -> str:
    """Stable hash of an ordered image id list."""
    return hashlib.sha256("\n".join(map(str, image_ids)).encode()).hexdigest()[:16]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def spec_problems(found: Mapping[str, Any], expect: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a cache's spec and the expected one (compared fields only)."""
    problems = []
    found, expect = {**DEFAULTS, **found}, {**DEFAULTS, **expect}
    for key in COMPARED:
        if key not in expect:
            continue
        if key not in found:
            problems.append(f"{key}: not recorded in the cache, expected {expect[key]!r}")
        elif not _same(found[key], expect[key]):
            if key == "weights_sha256":
                hint = " (random initialisation differs per run: save it and pass encoder.weights=FILE)" if expect.get("weights") is None else ""
                problems.append(f"weights: cache {found.get('weights')!r} (sha256 {str(found[key])[:12]}) "
                                f"!= expected {expect.get('weights')!r} (sha256 {str(expect[key])[:12]}){hint}")
            else:
                problems.append(f"{key}: cache {found[key]!r} != expected {expect[key]!r}")
    return problems


def prepare_command(cache_dir: str | Path, expect: Mapping[str, Any] | None = None, data_name: str | None = None) -> str:
    """The prepare_data.py command line that builds this cache."""
    parts = [PREPARE_SCRIPT, f"data={data_name or '<data config>'}"]
    if expect:
        parts.append(f"encoder={expect.get('encoder')}")
        for key in ("weights", "stage", "grid"):
            if expect.get(key) is not None:
                parts.append(f"encoder.{key}={expect[key]}")
        for key, value in (expect.get("options") or {}).items():
            parts.append(f"encoder.{key}={value}")
        if expect.get("image_size") is not None:
            parts.append(f"data.image_size={expect['image_size']}")
        if expect.get("precision", DEFAULTS["precision"]) != DEFAULTS["precision"]:
            parts.append(f"encoder.precision={expect['precision']}")
    parts.append(f"cache_dir={cache_dir}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Reading
class FeatureStore:
    """Cached features of a list of images, ``store[i] -> (L, D)``: the ``ImageStore`` interface for features.

    Rows are read from memory-mapped float16 ``.npy`` files, opened lazily in each process (a pickled
    store, e.g. sent to a spawned DataLoader worker, carries only paths and row numbers).
    """

    def __init__(self, files: Sequence[str | Path], file_index: Sequence[int], rows: Sequence[int],
                 feature_shape: tuple[int, int], dtype: torch.dtype = torch.float32):
        if len(file_index) != len(rows):
            raise ValueError("file_index and rows must have the same length")
        self.files = [Path(f) for f in files]
        self.file_index = np.asarray(file_index, dtype=np.int32)  # (N,)
        self.rows = np.asarray(rows, dtype=np.int64)  # (N,)
        self.feature_shape = (int(feature_shape[0]), int(feature_shape[1]))  # (L, D)
        self.dtype = dtype
        self._arrays: list[np.ndarray] | None = None

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(f, mmap_mode="r") for f in self.files]
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # a memmap would pickle as a full in-memory copy
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Tensor:
        arr = self._open()[self.file_index[i]]
        x = torch.from_numpy(np.array(arr[self.rows[i]]))  # (L, D) float16, copied out of the map
        return x if self.dtype == torch.float16 else x.to(self.dtype)

    def batch(self, indices: Sequence[int]) -> Tensor:
        """Features of several images at once: (B, L, D)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), *self.feature_shape), dtype=DTYPE)  # (B, L, D)
        arrays = self._open()
        for f in np.unique(self.file_index[idx]):
            sel = np.nonzero(self.file_index[idx] == f)[0]
            rows = self.rows[idx[sel]]
            order = np.argsort(rows)  # ascending rows read the map sequentially
            out[sel[order]] = arrays[f][rows[order]]
        x = torch.from_numpy(out)
        return x if self.dtype == torch.float16 else x.to(self.dtype)


def _read_json(path: Path) -> Any:
    with path.open("r", encoding="utf-8") as f:
        return json.load(f)


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete cache, or None when there is none; raises on an unreadable one."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = _read_json(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FeatureCacheError(cache_dir, f"{MANIFEST} is unreadable ({type(e).__name__}: {e}); rebuild the cache") from None
    if not isinstance(manifest, dict) or "spec" not in manifest or "splits" not in manifest:
        raise FeatureCacheError(cache_dir, f"{MANIFEST} is not a feature-cache manifest; rebuild the cache")
    return manifest


def open_cache(cache_dir: str | Path, expect: Mapping[str, Any], image_ids: Sequence[str],
               dtype: torch.dtype = torch.float32, data_name: str | None = None, hflip: bool = False) -> FeatureStore:
    """Open a cache for ``image_ids`` (any of its splits, in this order), refusing a missing, half-written or mismatched one.

    ``expect`` is ``captioner.models.encoder.feature_spec(encoder_cfg, image_size, encoder)``. Every compared field that differs,
    and image ids the cache lacks, are named in one ``FeatureCacheError``; ``data_name`` (the data config
    option, e.g. ``flickr8k``) completes the prepare command quoted in the message.
    """
    cache_dir = Path(cache_dir)
    command = prepare_command(cache_dir, expect, data_name) + (" data.hflip=true" if hflip else "")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        if cache_dir.is_dir() and any(p.name.endswith(CACHE_SUFFIXES) for p in cache_dir.iterdir()):
            raise FeatureCacheError(cache_dir, f"half-written feature cache (no {MANIFEST}: the prepare job did not finish); "
                                               f"run it again, it resumes: {command}")
        raise FeatureCacheError(cache_dir, f"no feature cache here; build it with: {command}")
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version: cache {manifest.get('format_version')!r} != expected {FORMAT_VERSION}")
    problems += spec_problems(manifest["spec"], expect)
    where: dict[str, tuple[int, int]] = {}
    splits = list(manifest["splits"].items())
    for f, (_, info) in enumerate(splits):
        for row, image_id in enumerate(info["image_ids"]):
            where[str(image_id)] = (f, row)
    missing = [i for i in image_ids if str(i) not in where]
    if missing:
        cached = ", ".join(f"{s} ({len(info['image_ids'])})" for s, info in splits)
        problems.append(f"image list: {len(missing)} of {len(image_ids)} requested images are not in the cache "
                        f"(e.g. {missing[0]!r}; cached splits: {cached})")
    if problems:
        raise FeatureCacheError(cache_dir, "stale or mismatched feature cache: " + "; ".join(problems)
                                + f". Rebuild it with: {command} overwrite=true (or point at another cache_dir)")
    feature_shape = tuple(manifest["feature_shape"])
    files = []
    for split, info in splits:
        path = cache_dir / info["file"]
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise FeatureCacheError(cache_dir, f"{info['file']} ({split}) is missing or unreadable ({type(e).__name__}); "
                                               f"rebuild with: {command} overwrite=true") from None
        expected_shape = (len(info["image_ids"]), *feature_shape)
        if arr.shape != expected_shape or arr.dtype != DTYPE:
            raise FeatureCacheError(cache_dir, f"{info['file']} holds {arr.dtype} {arr.shape}, the manifest says float16 "
                                               f"{expected_shape}; rebuild with: {command} overwrite=true")
        files.append(path)
    pairs = [where[str(i)] for i in image_ids]
    return FeatureStore(files, [p[0] for p in pairs], [p[1] for p in pairs], feature_shape, dtype)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Writing
def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj))


def _lock(cache_dir: Path) -> Any:
    """Hold an exclusive lock on ``cache_dir`` for this process's lifetime (two writers would corrupt it)."""
    import fcntl

    f = (cache_dir / LOCK).open("a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FeatureCacheError(cache_dir, "another prepare job is writing this cache; wait for it or choose another cache_dir") from None
    return f


@dataclasses.dataclass
class Fp16Error:
    """Running statistics of the float32 -> float16 rounding error of everything written."""

    count: int = 0
    sum_abs_error: float = 0.0
    max_abs_error: float = 0.0
    sum_abs_value: float = 0.0
    max_abs_value: float = 0.0

    def update(self, exact: Tensor, stored: Tensor) -> None:
        """Add a batch: float32 features and their float16 copies."""
        err = (stored.float() - exact).abs()
        self.count += exact.numel()
        self.sum_abs_error += float(err.sum(dtype=torch.float64))
        self.max_abs_error = max(self.max_abs_error, float(err.max()))
        self.sum_abs_value += float(exact.abs().sum(dtype=torch.float64))
        self.max_abs_value = max(self.max_abs_value, float(exact.abs().max()))

    def merge(self, other: "Fp16Error") -> "Fp16Error":
        """Combined statistics of two disjoint sets of features."""
        return Fp16Error(self.count + other.count, self.sum_abs_error + other.sum_abs_error,
                         max(self.max_abs_error, other.max_abs_error), self.sum_abs_value + other.sum_abs_value,
                         max(self.max_abs_value, other.max_abs_value))

    def summary(self) -> dict[str, float]:
        """max/mean absolute error, mean absolute value, and their ratio."""
        n = max(self.count, 1)
        return {"max_abs_error": self.max_abs_error, "mean_abs_error": self.sum_abs_error / n,
                "max_abs_value": self.max_abs_value, "mean_abs_value": self.sum_abs_value / n,
                "mean_relative_error": self.sum_abs_error / max(self.sum_abs_value, 1e-30), "values": self.count}


class CacheWriter:
    """Writes a cache split by split, resumably; the manifest goes last, so readers never see a partial cache.

    Per split ``S``: rows go to ``S.npy.partial`` (a float16 memmap) with ``S.progress.json`` recording
    how many rows are flushed; a finished split is renamed to ``S.npy`` with ``S.done.json``. A split
    whose done/progress record matches the spec and the image ids is reused / resumed; anything else is
    rewritten. ``finish`` writes the manifest over every finished split of this spec in the directory.
    """

    def __init__(self, cache_dir: str | Path, spec: Mapping[str, Any], image_ids: Mapping[str, Sequence[str]],
                 overwrite: bool = False, info: Mapping[str, Any] | None = None):
        self.dir = Path(cache_dir)
        self.spec = dict(spec)
        self.digest = spec_digest(spec)
        self.image_ids = {s: [str(i) for i in ids] for s, ids in image_ids.items()}
        self.info = dict(info or {})
        seen: dict[str, str] = {}
        for split, ids in self.image_ids.items():
            for i in ids:
                if i in seen:
                    raise ValueError(f"image id {i!r} appears in both {seen[i]!r} and {split!r}; a cache needs unique ids")
                seen[i] = split
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.dir)
        try:
            self._reconcile(overwrite)
        except BaseException:
            self.close()
            raise

    def _reconcile(self, overwrite: bool) -> None:
        """Refuse or clear a cache for another spec; drop the manifest if a file it names will be rewritten."""
        manifest = read_manifest(self.dir)
        if manifest is not None:
            problems = spec_problems(manifest["spec"], self.spec)
            if manifest.get("format_version") != FORMAT_VERSION:
                problems.insert(0, f"format_version {manifest.get('format_version')!r} != {FORMAT_VERSION}")
            if problems and not overwrite:
                raise FeatureCacheError(self.dir, "holds a cache for something else (" + "; ".join(problems)
                                        + "); pass overwrite=true to replace it, or choose another cache_dir")
            if problems:
                self.clear()
            elif any(not self.is_done(s) for s in self.image_ids if s in manifest["splits"]):
                (self.dir / MANIFEST).unlink()  # a file it names is about to be replaced

    def clear(self) -> None:
        """Delete every cache file in the directory (manifest first)."""
        (self.dir / MANIFEST).unlink(missing_ok=True)
        for p in self.dir.iterdir():
            if p.is_file() and p.name.endswith(CACHE_SUFFIXES):
                p.unlink()

    def _record(self, split: str, kind: str) -> dict[str, Any] | None:
        path = self.dir / f"{split}.{kind}.json"
        try:
            rec = _read_json(path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        ok = isinstance(rec, dict) and rec.get("format_version") == FORMAT_VERSION and rec.get("spec_digest") == self.digest
        return rec if ok else None

    def is_done(self, split: str) -> bool:
        """Whether ``split`` is already cached for this spec and these image ids."""
        rec = self._record(split, "done")
        return (rec is not None and rec.get("ids_digest") == ids_digest(self.image_ids[split])
                and (self.dir / f"{split}.npy").is_file())

    def resume_row(self, split: str) -> int:
        """Rows of ``split`` already flushed by an interrupted run (0 when starting afresh)."""
        rec = self._record(split, "progress")
        if rec is None or rec.get("ids_digest") != ids_digest(self.image_ids[split]):
            return 0
        if not (self.dir / f"{split}.npy.partial").is_file():
            return 0
        return int(rec["rows_done"])

    def open_split(self, split: str, feature_shape: tuple[int, int], resume: bool) -> np.memmap:
        """The partial memmap of ``split`` (N, L, D), reopened when resuming."""
        path = self.dir / f"{split}.npy.partial"
        shape = (len(self.image_ids[split]), *feature_shape)
        if resume and path.is_file():
            arr = np.lib.format.open_memmap(path, mode="r+")
            if arr.shape == shape and arr.dtype == DTYPE:
                return arr
            del arr
        (self.dir / f"{split}.progress.json").unlink(missing_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=shape)

    def checkpoint(self, split: str, arr: np.memmap, rows_done: int, stats: Fp16Error, seconds: float) -> None:
        """Flush ``arr`` and record that its first ``rows_done`` rows are final."""
        arr.flush()
        _write_json_atomic(self.dir / f"{split}.progress.json", {
            "format_version": FORMAT_VERSION, "spec_digest": self.digest, "ids_digest": ids_digest(self.image_ids[split]),
            "rows_done": rows_done, "fp16": dataclasses.asdict(stats), "seconds": seconds})

    def progress_stats(self, split: str) -> tuple[Fp16Error, float]:
        """Rounding statistics and seconds already spent on an interrupted split."""
        rec = self._record(split, "progress")
        if rec is None:
            return Fp16Error(), 0.0
        return Fp16Error(**rec["fp16"]), float(rec.get("seconds", 0.0))

    def finish_split(self, split: str, arr: np.memmap, stats: Fp16Error, seconds: float) -> None:
        """Flush, rename the partial file to ``split.npy`` and record it as done."""
        arr.flush()
        del arr
        partial, final = self.dir / f"{split}.npy.partial", self.dir / f"{split}.npy"
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, final)
        _write_json_atomic(self.dir / f"{split}.done.json", {
            "format_version": FORMAT_VERSION, "spec_digest": self.digest, "ids_digest": ids_digest(self.image_ids[split]),
            "image_ids": self.image_ids[split], "fp16": dataclasses.asdict(stats), "seconds": seconds})
        (self.dir / f"{split}.progress.json").unlink(missing_ok=True)

    def finish(self) -> dict[str, Any]:
        """Write the manifest over every finished split of this spec; returns it."""
        splits: dict[str, Any] = {}
        total = Fp16Error()
        feature_shape = None
        for done in sorted(self.dir.glob("*.done.json")):
            split = done.name[: -len(".done.json")]
            rec = self._record(split, "done")
            npy = self.dir / f"{split}.npy"
            if rec is None or not npy.is_file():
                continue
            arr = np.load(npy, mmap_mode="r")
            if arr.shape[0] != len(rec["image_ids"]):
                continue
            if feature_shape is not None and tuple(arr.shape[1:]) != feature_shape:
                raise FeatureCacheError(self.dir, f"{npy.name} has features {arr.shape[1:]}, other splits {feature_shape}")
            feature_shape = tuple(arr.shape[1:])
            stats = Fp16Error(**rec["fp16"])
            total = total.merge(stats)
            splits[split] = {"file": npy.name, "count": int(arr.shape[0]), "shape": list(arr.shape),
                             "seconds": rec.get("seconds"), "fp16_error": stats.summary(), "image_ids": rec["image_ids"]}
        missing = [s for s in self.image_ids if s not in splits]
        if missing:
            raise FeatureCacheError(self.dir, f"splits {missing} were not finished; the manifest is not written")
        manifest = {"format_version": FORMAT_VERSION, "spec": self.spec, "dtype": "float16",
                    "feature_shape": list(feature_shape or ()), "fp16_error": total.summary(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, **self.info,
                    "splits": splits}
        _write_json_atomic(self.dir / MANIFEST, manifest)
        self.close()
        return manifest

    def close(self) -> None:
        """Release the directory lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
