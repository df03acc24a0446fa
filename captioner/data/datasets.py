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


SIDE_WORDS = frozenset({"left", "right"})  # words a mirrored image would make false


class CaptionGroups(Dataset):
    """Training items: one image with ``k`` of its reference captions.

    Encoding an image once for several captions saves most of the encoder's cost when it is trained.
    Which ``k`` captions an image contributes rotates with the epoch (``set_epoch``), deterministically,
    so every caption is used and a resumed run sees the same data as an uninterrupted one. The rotation
    starts at a different caption for each image: datasets whose i-th reference always follows the same
    template (the shapes world) would otherwise show one template pair per epoch to every image, and
    the model would drift from template to template with the epochs.

    With ``hflip``, each image is mirrored left-right with probability 1/2, drawn afresh every epoch from
    ``seed`` and the epoch alone (a resumed run mirrors the same images). A photo (3, S, S) is flipped;
    cached features (L, D) are replaced by the features of the mirrored photo, item i of ``mirrored``
    (the cache's ``train_mirrored`` split). Mirroring the cached grid instead would change nothing: every
    decoder here treats the L locations as a set (attention weights and the mean are invariant to their
    order), so a mirrored grid is the same input. Images whose references say "left" or "right" are
    never mirrored: their captions stay true, and so do the references the SCST reward reads.
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, images: ImageStore, max_len: int,
                 captions_per_image: int | None = None, hflip: bool = False, seed: int = 0,
                 mirrored: Sequence[Tensor] | None = None):
        if hflip and mirrored is None and len(images) and images[0].dim() != 3:
            raise ValueError("data.hflip with cached features needs the features of the mirrored photos (the cache's "
                             "train_mirrored split, written by prepare_data.py with data.hflip=true)")
        if mirrored is not None and len(mirrored) != len(images):
            raise ValueError(f"{len(mirrored)} mirrored items for {len(images)} images")
        self.images, self.mirrored = images, mirrored
        self.captions = [[vocab.encode(t, max_len) for t in r.tokens] for r in records]
        self.k = captions_per_image
        self.epoch = 0
        self.hflip, self.seed = bool(hflip), int(seed)
        self.mirrorable = torch.tensor([not any(SIDE_WORDS.intersection(t) for t in r.tokens) for r in records], dtype=torch.bool)
        self.flips = self._draw_flips()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.flips = self._draw_flips()

    def _draw_flips(self) -> Tensor:
        """(N,) bool: which images this epoch mirrors."""
        if not self.hflip:
            return torch.zeros(len(self.captions), dtype=torch.bool)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7)
        return (torch.rand(len(self.captions), generator=g) < 0.5) & self.mirrorable

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[Tensor, list[list[int]], int]:
        caps = self.captions[i]
        k = len(caps) if not self.k else min(self.k, len(caps))
        first = (self.epoch * k + i) % len(caps)
        chosen = [caps[(first + j) % len(caps)] for j in range(k)]
        if not self.flips[i]:
            return self.images[i], chosen, i
        return (self.mirrored[i] if self.mirrored is not None else self.images[i].flip(-1)), chosen, i


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


def collate_groups(batch: Sequence[tuple[Tensor, list[list[int]], int]]) -> dict[str, Tensor]:
    """Images (B,3,S,S) uint8; captions (N,T) padded with lengths (N,); image_of (N,) maps captions to images."""
    images = torch.stack([b[0] for b in batch])
    caps = [c for b in batch for c in b[1]]
    image_of = torch.tensor([k for k, b in enumerate(batch) for _ in b[1]], dtype=torch.long)
    captions, lengths = pad_captions(caps)
    return {"images": images, "captions": captions, "lengths": lengths, "image_of": image_of, "index": torch.tensor([b[2] for b in batch])}


def collate_images(batch: Sequence[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Stack images (B,3,S,S) and their indices (B,)."""
    return {"images": torch.stack([b[0] for b in batch]), "index": torch.tensor([b[1] for b in batch])}


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, that can start part-way through.

    Like ``DistributedSampler``: the permutation is padded (by repeating its head) to a multiple of
    ``world_size`` and rank r takes every world_size-th index from r, so step s of all ranks together
    covers the same images as step s of one process with world_size times the batch. ``start`` (per
    rank) skips what was already trained, for exact mid-epoch resume.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.rank, self.world_size = rank, world_size
        self.per_rank = -(-n // world_size)  # ceil

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use the permutation of ``epoch``, skipping this rank's first ``start`` indices."""
        self.epoch, self.start = epoch, start

    def permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        pad = self.per_rank * self.world_size - self.n
        if pad:
            perm = torch.cat([perm, perm[:pad]])
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
