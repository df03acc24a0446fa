"""Torch datasets over ``ImageRecord`` lists: (image, caption) pairs for training, images for evaluation."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from captioner.data.images import load_image, uint8_tensor
from captioner.data.sources import ImageRecord
from captioner.data.vocab import Vocabulary

log = logging.getLogger(__name__)


class ImageStore:
    """Decoded, resized uint8 images for a list of records, optionally all held in RAM."""

    def __init__(self, records: Sequence[ImageRecord], size: int, preload: bool = False, progress: bool = False):
        self.paths = [r.path for r in records]
        self.size = size
        self.cache: Tensor | None = None
        if preload:
            from tqdm import tqdm

            cache = torch.empty(len(self.paths), 3, size, size, dtype=torch.uint8)  # (N, 3, S, S)
            for i, p in enumerate(tqdm(self.paths, desc="loading images", disable=not progress, leave=False)):
                cache[i] = uint8_tensor(load_image(p), size)
            self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        if self.cache is not None:
            return self.cache[i]
        return uint8_tensor(load_image(self.paths[i]), self.size)  # (3, S, S)


class CaptionPairs(Dataset):
    """Every (image, reference caption) pair of a split; items are (image uint8 (3,S,S), ids, image index)."""

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, images: ImageStore, max_len: int):
        self.images = images
        self.pairs: list[tuple[int, list[int]]] = []
        for i, r in enumerate(records):
            for toks in r.tokens:
                self.pairs.append((i, vocab.encode(toks, max_len)))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> tuple[Tensor, list[int], int]:
        i, ids = self.pairs[k]
        return self.images[i], ids, i


class ImagesOnly(Dataset):
    """One item per image, for decoding: (image uint8 (3,S,S), image index)."""

    def __init__(self, images: ImageStore):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], i


def pad_captions(captions: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into (B, T) with their lengths (B,)."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    out = torch.full((len(captions), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for b, c in enumerate(captions):
        out[b, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out, lengths


def collate_pairs(batch: Sequence[tuple[Tensor, list[int], int]]) -> dict[str, Tensor]:
    """Stack images, pad captions: images (B,3,S,S) uint8, captions (B,T), lengths (B,), index (B,)."""
    images = torch.stack([b[0] for b in batch])
    captions, lengths = pad_captions([b[1] for b in batch])
    return {"images": images, "captions": captions, "lengths": lengths, "index": torch.tensor([b[2] for b in batch])}


def collate_images(batch: Sequence[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Stack images (B,3,S,S) and their indices (B,)."""
    return {"images": torch.stack([b[0] for b in batch]), "index": torch.tensor([b[1] for b in batch])}


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through (exact mid-epoch resume)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use the permutation of ``epoch``, skipping its first ``start`` indices."""
        self.epoch, self.start = epoch, start

    def permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start
