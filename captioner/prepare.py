"""The prepare job: encode a dataset's images once with a frozen encoder into a feature cache.

``python scripts/prepare_data.py data=flickr8k encoder=efficientnet_lite0 cache_dir=data_cache/flickr8k_efficientnet_lite0_last``
Images are decoded by DataLoader workers and normalised exactly as the training loop does
(``ImageStore`` -> ``normalise_uint8``), so cached features equal the ones training would compute.
An interrupted job resumes from its last flush when run again with the same arguments.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.config import DataConfig, EncoderConfig
from captioner.data.datasets import ImageStore
from captioner.config import ConfigError
from captioner.data.build import load_records
from captioner.data.features import FP16_MAX, CacheWriter, FeatureCacheError, Fp16Error
from captioner.models.encoder import Encoder, encoder_kwargs, feature_spec
from captioner.utils import pick_device
from captioner.data.images import ImageLoadError, normalise_uint8
from captioner.data.sources import SPLITS, ImageRecord
from captioner.data.build import MIRRORED, mirrored_id

log = logging.getLogger(__name__)


class _LoadImages(Dataset):
    """(uint8 image (3, S, S), index, None), or (None, index, (path, reason)) for an unreadable file.

    The error travels as data because DataLoader workers cannot re-raise ``ImageLoadError`` itself
    (its constructor takes two arguments), and a one-line message naming the file beats a worker traceback.
    """

    def __init__(self, store: ImageStore, mirror: bool = False):
        self.store, self.mirror = store, mirror

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, tuple[str, str] | None]:
        try:
            image = self.store[i]  # (3, S, S) uint8
            return (image.flip(-1) if self.mirror else image), i, None
        except ImageLoadError as e:
            return None, i, (str(e.path), e.reason)


def _collate(batch: Sequence[tuple[Tensor | None, int, tuple[str, str] | None]]) -> dict[str, Any]:
    """Stack images (B, 3, S, S), or pass on the first load error."""
    for _, _, err in batch:
        if err is not None:
            return {"error": err}
    return {"images": torch.stack([b[0] for b in batch]), "index": torch.tensor([b[1] for b in batch])}  # type: ignore[misc]


@dataclass
class PrepareConfig:
    """The prepare job (``conf/prepare.yaml``)."""

    data: DataConfig = MISSING
    encoder: EncoderConfig = MISSING
    cache_dir: str = MISSING
    splits: list[str] = field(default_factory=lambda: list(SPLITS))  # which splits to encode
    batch_size: int = 32  # images per encoder forward
    num_workers: int = 2  # DataLoader processes decoding JPEGs (0: in the main process)
    threads: Optional[int] = None  # torch intra-op threads for the encoder on CPU
    device: str = "auto"  # auto | cpu | cuda
    overwrite: bool = False  # replace a cache made for another encoder/transform in cache_dir
    checkpoint_every: int = 25  # batches between flushes an interrupted job resumes from
    progress: bool = True


def register_prepare_config() -> None:
    """Register ``prepare_schema`` (and the group schemas it uses) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from captioner.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)


@torch.inference_mode()
def feature_shape(encoder: torch.nn.Module, image_size: int, device: torch.device) -> tuple[int, int]:
    """(L, D) of the encoder's output at ``image_size``."""
    out = encoder(torch.zeros(1, 3, image_size, image_size, device=device))  # (1, L, D)
    return int(out.shape[1]), int(out.shape[2])


def encode_to_cache(records: Mapping[str, Sequence[ImageRecord]], encoder: torch.nn.Module, spec: Mapping[str, Any],
                    cache_dir: str | Path, batch_size: int = 32, num_workers: int = 2, device: str | torch.device = "cpu",
                    overwrite: bool = False, checkpoint_every: int = 25, progress: bool = True,
                    info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Encode every split of ``records`` with the frozen ``encoder`` into ``cache_dir``; returns the manifest.

    A split named ``MIRRORED`` ("train_mirrored") is encoded from its photos mirrored left-right, under the
    ids ``mirrored_id(image_id)`` (what ``data.hflip`` reads).

    ``spec`` is ``feature_spec(...)`` of this encoder. Splits already cached for this spec and image
    list are skipped, an interrupted split resumes from its last checkpoint, and the manifest is written
    only when every split is complete.
    """
    device = torch.device(device)
    image_size = int(spec["image_size"])
    ids = {s: [mirrored_id(r.image_id) if s == MIRRORED else r.image_id for r in rs] for s, rs in records.items()}
    writer = CacheWriter(cache_dir, spec, ids, overwrite, info)
    try:
        # channels_last: the depthwise convolutions of EfficientNet/MobileNet-style encoders run about
        # twice as fast in this layout on CPU (oneDNN); the numbers are the same up to float rounding.
        encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
        shape = feature_shape(encoder, image_size, device)
        for split, recs in records.items():
            if writer.is_done(split):
                log.info("%s: %d images already cached in %s, skipped", split, len(recs), cache_dir)
                continue
            _encode_split(writer, split, recs, encoder, shape, image_size, batch_size, num_workers, device,
                          checkpoint_every, progress)
        return writer.finish()
    finally:
        writer.close()


def _encode_split(writer: CacheWriter, split: str, recs: Sequence[ImageRecord], encoder: torch.nn.Module,
                  shape: tuple[int, int], image_size: int, batch_size: int, num_workers: int, device: torch.device,
                  checkpoint_every: int, progress: bool) -> None:
    """Encode one split into its partial file, resuming where an interrupted run stopped."""
    start = writer.resume_row(split)
    stats, seconds = writer.progress_stats(split) if start else (Fp16Error(), 0.0)
    if start:
        log.info("%s: resuming at image %d of %d", split, start, len(recs))
    arr = writer.open_split(split, shape, resume=start > 0)
    loader = DataLoader(_LoadImages(ImageStore(recs[start:], image_size), mirror=split == MIRRORED), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    row, t0 = start, time.time()
    bar = tqdm(total=len(recs), initial=start, desc=f"encoding {split}", unit="img", disable=not progress,
               mininterval=2.0, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for b, batch in enumerate(loader, 1):
                if "error" in batch:
                    raise ImageLoadError(*batch["error"])
                row = _encode_batch(encoder, batch["images"], device, arr, row, stats, writer.dir, split, recs)
                bar.update(batch["images"].shape[0])
                if b % checkpoint_every == 0:
                    writer.checkpoint(split, arr, row, stats, seconds + time.time() - t0)
    except BaseException:
        with contextlib.suppress(Exception):  # rows before `row` are final: a rerun resumes there
            writer.checkpoint(split, arr, row, stats, seconds + time.time() - t0)
        raise
    finally:
        bar.close()
    elapsed = time.time() - t0
    writer.finish_split(split, arr, stats, seconds + elapsed)
    log.info("%s: %d images encoded in %.1fs (%.1f images/s), max fp16 error %.2e", split, row - start, elapsed,
             (row - start) / max(elapsed, 1e-9), stats.max_abs_error)


def _encode_batch(encoder: torch.nn.Module, images: Tensor, device: torch.device, arr: Any, row: int, stats: Fp16Error,
                  cache_dir: str | Path, split: str, recs: Sequence[ImageRecord]) -> int:
    """Encode uint8 images (B, 3, S, S) into rows ``row:row+B`` of ``arr``; returns the next row."""
    x = normalise_uint8(images.to(device, non_blocking=True), encoder.mean, encoder.std)  # (B, 3, S, S)
    x = x.contiguous(memory_format=torch.channels_last)
    exact = encoder(x).float()  # (B, L, D)
    stored = exact.half()  # (B, L, D)
    if not torch.isfinite(stored).all():
        raise FeatureCacheError(cache_dir, f"{split}: non-finite or beyond-float16 features (max |x| "
                                           f"{exact.abs().max().item():.4g}; float16 stops at {FP16_MAX:.0f}) near image "
                                           f"{recs[row].image_id!r}")
    n = stored.shape[0]
    arr[row : row + n] = stored.cpu().numpy()
    stats.update(exact, stored)
    return row + n


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Encode the configured dataset splits into ``cfg.cache_dir``; returns a summary (counts, time, fp16 error)."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.encoder.freeze:
        raise ConfigError(f"encoder.freeze=false: a feature cache holds a frozen encoder's features; "
                         f"pass encoder.freeze=true to cache {cfg.encoder.name}")
    unknown = sorted(set(cfg.splits) - set(SPLITS))
    if unknown:
        raise ConfigError(f"unknown splits {unknown}; choose from {list(SPLITS)}")
    records = load_records(cfg.data)
    chosen = {s: records[s] for s in cfg.splits if records.get(s)}
    if cfg.data.hflip and "train" in chosen:  # the mirrored training photos too, for data.hflip
        chosen[MIRRORED] = chosen["train"]
    for s in cfg.splits:
        if not records.get(s):
            log.warning("split %s has no images in %s; nothing to cache for it", s, cfg.data.root)
    device = pick_device(cfg.device)
    encoder = Encoder(**encoder_kwargs(cfg.encoder))
    spec = feature_spec(cfg.encoder, cfg.data.image_size, encoder, device)
    info = {"data": {"name": cfg.data.name, "format": cfg.data.format, "root": str(Path(cfg.data.root).expanduser().resolve())}}
    log.info("caching %s features (%s, %s arithmetic) of %s into %s", cfg.encoder.name, cfg.encoder.stage or "native grid",
             spec["precision"], ", ".join(f"{len(r)} {s}" for s, r in chosen.items()), cfg.cache_dir)
    manifest = encode_to_cache(chosen, encoder, spec, cfg.cache_dir, cfg.batch_size, cfg.num_workers, device,
                               cfg.overwrite, cfg.checkpoint_every, cfg.progress, info)
    seconds = time.time() - t0
    encoded = {s: manifest["splits"][s]["count"] for s in chosen}
    return {"cache_dir": str(cfg.cache_dir), "images": encoded, "feature_shape": manifest["feature_shape"],
            "encode_seconds": {s: round(manifest["splits"][s]["seconds"] or 0.0, 1) for s in chosen},
            "seconds": round(seconds, 1), "fp16_error": manifest["fp16_error"]}
