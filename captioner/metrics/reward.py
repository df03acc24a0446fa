"""CIDEr-D (optionally plus BLEU-4) of sampled captions as a per-caption reward, for self-critical training.

The score of one caption is COCO's per-image CIDEr-D of that caption against all references of its
image (:func:`captioner.metrics.cider_d_scores`, the same rules: PTB tokenisation, tf-idf n-gram vectors
for n = 1..4, the hypothesis weight clipped at the reference's, the bigram-count length penalty with
sigma 6, x10), with one difference of *set*: the document frequencies and ``log N`` come from the
whole training split's references, computed once at construction, instead of from the evaluated set.
When the evaluated set is that same reference set the two agree to rounding (tested to 1e-9).

Everything that depends on the references alone is prepared once, for every training image: the
n-gram ids, their idf, each reference's tf-idf entries and norms, and (for BLEU) each image's largest
count of every n-gram. Scoring a batch then costs one tokenisation per caption and a few dozen
vectorised array operations for the whole batch.

``include_end`` (default on; SacreEOS, Hu et al. 2023): the end token is counted as a word ``<end>``.
Precisely: every reference gets ``<end>`` appended (before document frequencies are counted), and a
hypothesis gets ``<end>`` appended iff the sampler emitted the end token, and a caption cut at
``max_len`` without it gets ``<cut>``, a token no reference has. The reward is then exactly
``cider_d_scores`` of those extended token lists. ``<end>`` itself is in every image's references, so its
idf is 0; what it adds are the n-grams that end a sentence ("a dog <end>", "on the <end>"), so a fragment
that stops mid-phrase matches no reference ending and scores lower. ``<cut>``'s n-grams match nothing, so
a caption that never ends scores like one that ends wrongly: without it, a cut caption would have fewer
unmatched n-grams than the same words with a wrong ending and score *higher*, and SCST learns to stop
ending its captions (shapes world, two SCST epochs from a 3-epoch checkpoint: 79-86% of the samples
finished per epoch, falling within the epoch, and greedy captions became repetitions running to
``decode.max_len``; with ``<cut>``, 90-95%). Either token adds one to the
hypothesis' length as ``<end>`` does to the references', so the length penalty is unchanged. The
tokenizer never produces ``<end>`` or ``<cut>`` from text (it splits ``<``, ``end``, ``>``), so they
cannot collide with a word.

``bleu4_weight`` w: reward = CIDEr-D + w * BLEU-4, BLEU-4 being COCO's per-image BLEU-4 (the per-image
value of :func:`captioner.metrics.bleu_scores`, on a 0-1 scale) of the same token lists (with ``<end>``
when ``include_end``). That is the unsmoothed definition up to pycocoevalcap's 1e-15 / 1e-9 constants,
so a caption without a single matching 4-gram gets about 0 (not an add-one smoothed value): the
reward then agrees with the metric that is reported, at the price of a sparse BLEU signal for short
or poor captions (CIDEr-D carries the signal there).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captioner.data.tokenize import tokenize
from captioner.data.vocab import Vocabulary

END_WORD = "<end>"
CUT_WORD = "<cut>"  # appended to a caption cut at max_len; in no reference
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU constants (see captioner.metrics.bleu)


class _Order:
    """Reference-side tables of the n-grams of one order n."""

    __slots__ = ("entry_key", "entry_ref", "entry_weight", "idf", "keys", "max_count", "max_key")

    def __init__(self, keys: np.ndarray, idf: np.ndarray, entry_key: np.ndarray, entry_ref: np.ndarray,
                 entry_weight: np.ndarray, max_key: np.ndarray, max_count: np.ndarray):
        self.keys = keys  # (G,) sorted chained keys prefix_id * num_tokens + last_token; the position is the n-gram id
        self.idf = idf  # (G,) log N - log df
        self.entry_key = entry_key  # (E,) sorted image * G + gram, one entry per (reference, n-gram)
        self.entry_ref = entry_ref  # (E,) index of the reference within its image
        self.entry_weight = entry_weight  # (E,) tf-idf weight in that reference
        self.max_key = max_key  # (K,) sorted image * G + gram, for BLEU clipping
        self.max_count = max_count  # (K,) largest count of the n-gram in one reference of the image


class CiderDReward:
    """Per-caption CIDEr-D (+ ``bleu4_weight`` * BLEU-4) against a fixed reference set, e.g. the training split.

    ``references[i]`` holds the raw reference strings of image i (tokenised with the metrics' tokenizer)
    or already tokenised lists (taken as they are). ``vocab`` turns sampled token ids into words.
    ``image_ids`` optionally names the images so that callers may pass ids instead of indices.
    """

    def __init__(self, references: Sequence[Sequence[str | Sequence[str]]], vocab: Vocabulary | None = None, *,
                 include_end: bool = True, bleu4_weight: float = 0.0, sigma: float = 6.0, max_n: int = 4,
                 image_ids: Sequence[Hashable] | None = None):
        if not references:
            raise ValueError("no reference images")
        if any(len(refs) == 0 for refs in references):
            raise ValueError("every image needs at least one reference")
        if image_ids is not None and len(image_ids) != len(references):
            raise ValueError(f"{len(image_ids)} image ids for {len(references)} reference lists")
        self.vocab, self.include_end, self.bleu4_weight = vocab, bool(include_end), float(bleu4_weight)
        self.sigma, self.max_n = float(sigma), int(max_n)
        self.id_index = {k: i for i, k in enumerate(image_ids)} if image_ids is not None else None
        tail = [END_WORD] if self.include_end else []
        sentences = [[*(tokenize(r) if isinstance(r, str) else list(r)), *tail] for refs in references for r in refs]
        self.num_images = len(references)
        counts = np.fromiter(map(len, references), np.int64, self.num_images)
        self.ref_start = np.cumsum(counts) - counts  # (N,) first reference of each image
        self.ref_count = counts  # (N,)
        self.max_refs = int(counts.max())
        ref_image = np.repeat(np.arange(self.num_images), counts)  # (R,)
        self.ref_len = np.fromiter(map(len, sentences), np.int64, len(sentences))  # (R,) tokens
        self.log_n = math.log(float(self.num_images))

        self.token_index: dict[str, int] = {}
        for s in sentences:
            for t in s:
                self.token_index.setdefault(t, len(self.token_index))
        num_tokens = len(self.token_index)
        ids = np.fromiter((self.token_index[t] for s in sentences for t in s), np.int64)  # (P,)
        sentence_of = np.repeat(np.arange(len(sentences)), self.ref_len)  # (P,)
        first = np.cumsum(self.ref_len) - self.ref_len
        remaining = self.ref_len[sentence_of] - (np.arange(len(ids)) - first[sentence_of])  # (P,) tokens left, this included

        self.orders: list[_Order] = []
        self.ref_norm = np.zeros((len(sentences), self.max_n))  # (R, n) tf-idf vector norms
        gram_at = ids
        num_refs = len(sentences)
        for n in range(1, self.max_n + 1):
            pos = np.flatnonzero(remaining >= n)  # (Q,) positions where an n-gram starts
            chained = ids[pos] if n == 1 else gram_at[pos] * num_tokens + ids[pos + n - 1]  # (Q,)
            keys, dense = np.unique(chained, return_inverse=True)  # (G,), (Q,)
            dense = dense.reshape(-1)
            G = len(keys)
            gram_at = np.full(len(ids), -1, dtype=np.int64)
            gram_at[pos] = dense
            # One entry per (n-gram, reference) with its count, sorted by n-gram then reference.
            pair, count = np.unique(dense * num_refs + sentence_of[pos], return_counts=True)
            gram, ref = pair // num_refs, pair % num_refs
            image = ref_image[ref]
            df = np.bincount(np.unique(gram * self.num_images + image) // self.num_images, minlength=G)  # (G,) images
            idf = self.log_n - np.log(np.maximum(df, 1.0))
            weight = count * idf[gram]  # (E,)
            self.ref_norm[:, n - 1] = np.sqrt(np.bincount(ref, weights=weight * weight, minlength=num_refs))
            entry_key = image * G + gram
            order = np.argsort(entry_key, kind="stable")  # within a key, references stay in order
            entry_key, count_sorted = entry_key[order], count[order]
            starts = np.flatnonzero(np.diff(entry_key, prepend=-1)) if len(entry_key) else entry_key
            max_key = entry_key[starts]
            max_count = np.maximum.reduceat(count_sorted, starts) if len(starts) else count_sorted
            self.orders.append(_Order(keys, idf, entry_key, ref[order] - self.ref_start[image[order]], weight[order],
                                      max_key, max_count))
        self.num_tokens = num_tokens

    @classmethod
    def from_records(cls, records: Sequence[Any], vocab: Vocabulary | None = None, **kwargs: Any) -> CiderDReward:
        """From dataset records (``ImageRecord``: raw ``captions`` and ``image_id``), indexed like the records."""
        return cls([list(r.captions) for r in records], vocab, image_ids=[r.image_id for r in records], **kwargs)

    # ----------------------------------------------------------------------------------------------
    def hypothesis_tokens(self, words: Sequence[str], finished: bool = True) -> list[str]:
        """The token list a caption is scored as: the metrics' tokenisation of its text, plus (with ``include_end``)
        ``<end>`` if it finished or ``<cut>`` if it was cut at ``max_len``."""
        toks = tokenize(" ".join(words))
        if self.include_end:
            toks.append(END_WORD if finished else CUT_WORD)
        return toks

    def _captions_from_ids(self, tokens: Tensor) -> tuple[list[list[str]], list[bool]]:
        """Word lists and finished flags of sampled id rows (N, T): words up to the first <end> (or <pad>)."""
        if self.vocab is None:
            raise ValueError("token ids need a vocabulary: build the reward with vocab=...")
        words, finished = [], []
        end, pad, table = self.vocab.end_id, self.vocab.pad_id, self.vocab.words
        for row in tokens.tolist():
            out, done = [], False
            for i in row:
                if i == end:
                    done = True
                    break
                if i == pad:
                    break
                out.append(table[i])
            words.append(out)
            finished.append(done)
        return words, finished

    def _image_indices(self, images: Tensor | Sequence[Any], n: int) -> np.ndarray:
        """(n,) int64 indices into the reference set from indices or (with ``image_ids``) ids."""
        if isinstance(images, Tensor):
            idx = images.detach().cpu().numpy().astype(np.int64).reshape(-1)
        else:
            images = list(images)
            if self.id_index is not None and images and not isinstance(images[0], (int, np.integer)):
                idx = np.array([self.id_index[i] for i in images], dtype=np.int64)
            else:
                idx = np.asarray(images, dtype=np.int64).reshape(-1)
        if len(idx) != n:
            raise ValueError(f"{len(idx)} image indices for {n} captions")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        return idx

    def __call__(self, captions: Tensor | Sequence[Sequence[str]], images: Tensor | Sequence[Any],
                 finished: Sequence[bool] | None = None) -> Tensor:
        """Rewards (N,) float64 of N captions for their images (indices or ids into the reference set).

        ``captions``: sampled ids (N, T) (words, then <end> if the caption finished, then <pad>), or word
        lists; for word lists ``finished`` says which emitted <end> (default: all). Returned on the
        device of an id tensor (CPU for word lists).
        """
        device = captions.device if isinstance(captions, Tensor) else torch.device("cpu")
        if isinstance(captions, Tensor):
            words, flags = self._captions_from_ids(captions)
        else:
            words = [list(c) for c in captions]
            flags = [True] * len(words) if finished is None else [bool(f) for f in finished]
        toks = [self.hypothesis_tokens(w, f) for w, f in zip(words, flags)]
        return torch.from_numpy(self.score_tokens(toks, self._image_indices(images, len(toks)))).to(device)

    # ----------------------------------------------------------------------------------------------
    def score_tokens(self, hypotheses: Sequence[Sequence[str]], image: np.ndarray) -> np.ndarray:
        """Rewards (M,) of token lists already in scoring form (see :meth:`hypothesis_tokens`) for images (M,)."""
        M = len(hypotheses)
        image = np.asarray(image, dtype=np.int64)
        if M == 0:
            return np.zeros(0)
        lengths = np.fromiter(map(len, hypotheses), np.int64, M)  # (M,)
        known, local = self.token_index, {}
        V = self.num_tokens
        # Unknown tokens get batch-local ids >= V, so distinct unknown words stay distinct n-grams.
        ids = np.fromiter((known[t] if t in known else V + local.setdefault(t, len(local))
                           for h in hypotheses for t in h), np.int64)  # (P,)
        Vb = V + len(local)
        sentence_of = np.repeat(np.arange(M), lengths)  # (P,)
        first = np.cumsum(lengths) - lengths
        remaining = lengths[sentence_of] - (np.arange(len(ids)) - first[sentence_of])  # (P,)

        R = self.max_refs
        dot = np.zeros(M * R * self.max_n)  # (M, R, n) flattened: clipped products per reference and order
        hyp_norm = np.zeros((M, self.max_n))
        correct = np.zeros((M, self.max_n))  # BLEU: clipped matches
        local_at = ids  # batch-dense id of the (n-1)-gram at each position (unknown grams included)
        global_at = np.where(ids < V, ids, -1)  # reference n-gram id of it, -1 if no reference has it
        for k, tab in enumerate(self.orders):
            n = k + 1
            pos = np.flatnonzero(remaining >= n)  # (Q,)
            if len(pos) == 0:
                break
            last = ids[pos + n - 1]
            if n == 1:
                local_key = last
                prefix = np.zeros(len(pos), dtype=np.int64)
            else:
                local_key = local_at[pos] * Vb + last
                prefix = global_at[pos]
            _uniq, local_dense = np.unique(local_key, return_inverse=True)
            local_dense = local_dense.reshape(-1)
            # The reference-side id: the chained key looked up among the reference n-grams.
            ok = (prefix >= 0) & (last < V)
            chained = last if n == 1 else prefix * V + last
            g = np.full(len(pos), -1, dtype=np.int64)
            if len(tab.keys):
                at = np.minimum(np.searchsorted(tab.keys, chained), len(tab.keys) - 1)
                g = np.where(ok & (tab.keys[at] == chained), at, -1)
            new_local = np.full(len(ids), -1, dtype=np.int64)
            new_local[pos] = local_dense
            new_global = np.full(len(ids), -1, dtype=np.int64)
            new_global[pos] = g
            local_at, global_at = new_local, new_global
            # Distinct (caption, n-gram) pairs with their counts.
            pair, first_pos, count = np.unique(local_dense * M + sentence_of[pos], return_index=True, return_counts=True)
            sent = pair % M
            gram = g[first_pos]  # (U,) reference n-gram id or -1
            idf = np.where(gram >= 0, tab.idf[np.maximum(gram, 0)], self.log_n)
            h = count * idf  # (U,) hypothesis tf-idf weights
            hyp_norm[:, k] = np.sqrt(np.bincount(sent, weights=h * h, minlength=M))
            hit = gram >= 0
            if not hit.any():
                continue
            sent_h, gram_h, h_h, count_h = sent[hit], gram[hit], h[hit], count[hit]
            query = image[sent_h] * len(tab.keys) + gram_h  # (H,)
            lo = np.searchsorted(tab.entry_key, query, "left")
            hi = np.searchsorted(tab.entry_key, query, "right")
            span = hi - lo  # (H,) references of the image holding the n-gram
            owner = np.repeat(np.arange(len(query)), span)  # (S,)
            entry = lo[owner] + np.arange(len(owner)) - np.repeat(np.cumsum(span) - span, span)  # (S,)
            w_ref = tab.entry_weight[entry]
            slot = (sent_h[owner] * R + tab.entry_ref[entry]) * self.max_n + k
            dot += np.bincount(slot, weights=np.minimum(h_h[owner], w_ref) * w_ref, minlength=len(dot))
            if self.bleu4_weight:
                at = np.minimum(np.searchsorted(tab.max_key, query), len(tab.max_key) - 1)
                best = np.where(tab.max_key[at] == query, tab.max_count[at], 0)
                correct[:, k] = np.bincount(sent_h, weights=np.minimum(count_h, best), minlength=M)

        # Gather each caption's references: (M, R) indices, padded where an image has fewer than R.
        slot_ref = np.arange(R)
        valid = slot_ref[None, :] < self.ref_count[image][:, None]  # (M, R)
        ref = np.where(valid, self.ref_start[image][:, None] + slot_ref[None, :], 0)  # (M, R)
        ref_norm = self.ref_norm[ref]  # (M, R, n)
        dot = dot.reshape(M, R, self.max_n)
        h_norm = hyp_norm[:, None, :]  # (M, 1, n)
        both = (h_norm != 0) & (ref_norm != 0)
        sim = np.divide(dot, h_norm * ref_norm, out=dot.copy(), where=both)  # (M, R, n)
        similarity = np.zeros((M, R))
        for k in range(self.max_n):  # summed order by order, as cider_d_scores does
            similarity += sim[:, :, k]
        # pycocoevalcap's length difference is the difference of bigram counts.
        delta = np.maximum(lengths[:, None] - 1, 0) - np.maximum(self.ref_len[ref] - 1, 0)  # (M, R)
        penalty = np.exp(-(delta.astype(np.float64) ** 2) / (2 * self.sigma**2))
        cider = (similarity * penalty * valid).sum(1) / self.max_n / self.ref_count[image] * 10.0  # (M,)
        if not self.bleu4_weight:
            return cider
        return cider + self.bleu4_weight * self._bleu4(correct, lengths, ref, valid)

    def _bleu4(self, correct: np.ndarray, lengths: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """COCO per-image BLEU-max_n (M,) from clipped matches (M, n), hypothesis lengths and reference slots (M, R)."""
        guess = np.maximum(lengths[:, None] - np.arange(self.max_n), 0).astype(np.float64)  # (M, n)
        precision = np.cumprod((correct + _TINY) / (guess + _SMALL), axis=1)[:, -1] ** (1.0 / self.max_n)  # (M,)
        ref_len = self.ref_len[ref]  # (M, R)
        # Closest reference length, ties to the shorter: minimise (|diff|, length) as one integer.
        m = int(self.ref_len.max()) + 1
        big = np.iinfo(np.int64).max
        code = np.where(valid, np.abs(ref_len - lengths[:, None]) * m + ref_len, big)
        closest = code.min(1) % m
        ratio = (lengths + _TINY) / (closest + _SMALL)
        penalty = np.exp(1 - 1 / ratio, where=ratio < 1, out=np.ones(len(lengths)))
        return precision * penalty
