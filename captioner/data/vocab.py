"""Vocabulary: words <-> ids with fixed special tokens."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3, fixed so checkpoints agree on them


class Vocabulary:
    """Maps tokens to ids; ``<pad>`` is always 0 so padding masks are ``ids != 0``."""

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the specials {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            dupes = sorted(w for w, c in Counter(words).items() if c > 1)
            raise ValueError(f"duplicate words in vocabulary: {dupes[:10]}")
        self.words: list[str] = words
        self.index: dict[str, int] = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None) -> "Vocabulary":
        """Build from tokenised captions, keeping words seen at least ``min_count`` times (most frequent first)."""
        counts = Counter(tok for caption in captions for tok in caption)
        kept = [w for w, c in counts.items() if c >= min_count and w not in SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))  # deterministic: by frequency, then alphabetically
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` as ids; unknown words map to ``<unk>``; at most ``max_len`` words kept."""
        if max_len is not None:
            tokens = tokens[:max_len]
        return [self.start_id] + [self.index.get(t, self.unk_id) for t in tokens] + [self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words for ``ids``, skipping ``<start>``/``<pad>`` and stopping at the first ``<end>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.words[i])
        return out

    def to_json(self) -> str:
        return json.dumps({"words": self.words}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically."""
        from captioner.utils import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a vocabulary JSON written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            words = data["words"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a vocabulary file ({e})") from None
        return cls(words)
