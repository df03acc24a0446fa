"""Sparse n-gram count tables of a whole evaluation corpus, shared by BLEU and CIDEr-D.

Counting n-grams sentence by sentence with dicts of tuples is what makes the reference
scorers slow. Here every token gets an integer id, and for each order n one sort of all
n-gram occurrences of the corpus by (n-gram, sentence) yields dense n-gram ids, the
(sentence, n-gram) counts, and, because references are numbered image by image, the
per-image groups needed for clipping and document frequencies. Keys of the form
``gram * num_images + image`` come out sorted, so lookups are binary searches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

Tokens = Sequence[str]


@dataclass(frozen=True)
class OrderCounts:
    """Counts of the n-grams of one order: one entry per (n-gram, sentence), sorted by n-gram then sentence."""

    sentence: np.ndarray  # (E,) int64: image index for hypotheses, reference index for references
    gram: np.ndarray  # (E,) int64: n-gram id, dense within the order, shared by hypotheses and references
    count: np.ndarray  # (E,) int64: occurrences of the n-gram in the sentence


@dataclass(frozen=True)
class ImageMaxCounts:
    """For each (n-gram, image) found in some reference of the image: its largest count in one reference."""

    key: np.ndarray  # (K,) int64, sorted: gram * num_images + image
    max_count: np.ndarray  # (K,) int64


@dataclass(frozen=True)
class CorpusNgrams:
    """The 1..max_n-gram counts of hypotheses (one per image) and of their references."""

    hyp_len: np.ndarray  # (I,) hypothesis lengths in tokens
    ref_len: np.ndarray  # (R,) reference lengths in tokens
    ref_image: np.ndarray  # (R,) image of each reference, non-decreasing
    num_grams: list[int]  # per order: number of distinct n-grams in the corpus
    hyp: list[OrderCounts]  # per order; hypothesis entries, sentence = image
    ref: list[OrderCounts]  # per order; reference entries, sentence = reference index
    ref_max: list[ImageMaxCounts]  # per order

    @property
    def num_images(self) -> int:
        """Number of images (= hypotheses)."""
        return len(self.hyp_len)

    @property
    def ref_starts(self) -> np.ndarray:
        """(I,) index of the first reference of each image."""
        return np.searchsorted(self.ref_image, np.arange(self.num_images))

    def hyp_keys(self, k: int) -> np.ndarray:
        """(E,) sorted ``gram * num_images + image`` of the hypothesis entries of order k + 1."""
        return self.hyp[k].gram * self.num_images + self.hyp[k].sentence

    def ref_keys(self, k: int) -> np.ndarray:
        """(E,) sorted ``gram * num_images + image`` of the reference entries of order k + 1."""
        return self.ref[k].gram * self.num_images + self.ref_image[self.ref[k].sentence]

    @classmethod
    def build(
        cls, references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens], max_n: int = 4
    ) -> CorpusNgrams:
        """Count the n-grams of tokenised hypotheses and references (images aligned by index)."""
        if len(references) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
        if not hypotheses:
            raise ValueError("no hypotheses to score")
        if any(len(refs) == 0 for refs in references):
            raise ValueError("every image needs at least one reference")
        num_images = len(hypotheses)
        # Sentences 0..I-1 are the hypotheses, then the references image by image.
        sentences: list[Tokens] = [*hypotheses, *chain.from_iterable(references)]
        ref_image = np.repeat(np.arange(num_images), np.fromiter(map(len, references), np.int64, num_images))
        lengths = np.fromiter(map(len, sentences), np.int64, len(sentences))

        tokens = list(chain.from_iterable(sentences))
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        ids = np.fromiter(map(vocab.__getitem__, tokens), np.int64, len(tokens))  # (T,)
        sentence_of = np.repeat(np.arange(len(sentences)), lengths)  # (T,)
        first = np.cumsum(lengths) - lengths
        remaining = lengths[sentence_of] - (np.arange(len(ids)) - first[sentence_of])  # (T,) tokens left, this included

        num_grams, hyp, ref, ref_max = [], [], [], []
        gram_at = ids  # (T,) dense id of the n-gram starting at each position, where there is one
        for n in range(1, max_n + 1):
            pos = np.flatnonzero(remaining >= n)  # (P,) start positions of n-grams
            # An n-gram is its (n-1)-gram followed by a token; dense previous ids keep this within int64.
            key = gram_at[pos] if n == 1 else gram_at[pos] * len(vocab) + ids[pos + n - 1]  # (P,)
            sent = sentence_of[pos]
            order = _argsort_pairs(key, sent, len(sentences))
            key, sent, pos = key[order], sent[order], pos[order]
            new_gram = np.empty(len(key), dtype=bool)
            new_gram[:1] = True
            np.not_equal(key[1:], key[:-1], out=new_gram[1:])
            dense = np.cumsum(new_gram) - 1  # (P,) dense n-gram ids, non-decreasing
            gram_at = np.full(len(ids), -1, dtype=np.int64)
            gram_at[pos] = dense
            new_entry = new_gram.copy()
            new_entry[1:] |= sent[1:] != sent[:-1]
            starts = np.flatnonzero(new_entry)
            count = np.diff(starts, append=len(key))
            gram, sent = dense[starts], sent[starts]
            is_hyp = sent < num_images
            num_grams.append(int(dense[-1]) + 1 if len(dense) else 0)
            hyp.append(OrderCounts(sent[is_hyp], gram[is_hyp], count[is_hyp]))
            ref.append(OrderCounts(sent[~is_hyp] - num_images, gram[~is_hyp], count[~is_hyp]))
            ref_max.append(_image_max_counts(ref[-1], ref_image, num_images))
        return cls(lengths[:num_images], lengths[num_images:], ref_image, num_grams, hyp, ref, ref_max)


def _argsort_pairs(major: np.ndarray, minor: np.ndarray, minor_size: int) -> np.ndarray:
    """Indices sorting by (major, minor); one combined-key sort when that fits in int64."""
    if len(major) == 0 or int(major.max()) < (2**62) // max(minor_size, 1):
        return np.argsort(major * minor_size + minor)
    return np.lexsort((minor, major))


def _image_max_counts(ref: OrderCounts, ref_image: np.ndarray, num_images: int) -> ImageMaxCounts:
    """Per (n-gram, image): the largest count in a single reference of the image."""
    # Entries are sorted by (gram, reference) and references are numbered image by image,
    # so equal (gram, image) keys are already adjacent.
    keys = ref.gram * num_images + ref_image[ref.sentence]
    if len(keys) == 0:
        return ImageMaxCounts(keys, ref.count)
    starts = np.flatnonzero(np.diff(keys, prepend=-1))
    return ImageMaxCounts(keys[starts], np.maximum.reduceat(ref.count, starts))


def lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` at the positions of ``queries`` in ``sorted_keys``, 0 where a query is absent."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), dtype=values.dtype)
    idx = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return np.where(sorted_keys[idx] == queries, values[idx], 0)
