"""The result type every decoding strategy returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class Caption:
    """One decoded caption: word ids (no <start>/<end>), words, log-probability and where the model looked.

    ``attention`` has one row per emitted word, ``(len(tokens), L)``, each row summing to 1.
    ``locations`` (hard attention) is the attended location index per word.
    """

    tokens: list[int]
    words: list[str]
    score: float  # the model's (unmasked) log-probabilities of the tokens and the final <end> (if emitted), summed
    attention: Tensor  # (T, L)
    finished: bool = True  # False when max_len was reached before <end>
    locations: list[int] | None = None

    @classmethod
    def build(cls, tokens: list[int], vocab: Any, score: float, attention: Tensor, finished: bool,
              locations: list[int] | None = None) -> "Caption":
        """A caption from word ids (no <start>/<end>) and its per-word attention rows (len(tokens), L)."""
        return cls(tokens=tokens, words=[vocab.words[i] for i in tokens], score=score, attention=attention.clone(),
                   finished=finished, locations=locations)

    @property
    def text(self) -> str:
        return " ".join(self.words)
