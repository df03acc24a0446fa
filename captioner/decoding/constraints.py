"""Word masks shared by every decoding strategy: ``<unk>`` suppression and blocking bad endings.

Greedy, sampling and beam search all call :meth:`DecodeMask.apply` on the log-probabilities (R, V) of
each ``decoder.step()`` before they choose; nothing else in ``captioner/decoding`` edits them (beam
search's ``no_repeat_ngram`` is the one beam-only rule and stays in beam.py).

What the masks mean (what the tests check against exhaustive enumeration):

- A banned choice gets -inf; nothing is renormalised. An allowed word keeps the model's own
  log-probability, so a caption's ``score`` is still the model's true (unconstrained) log-probability
  of its words and ``<end>``. The constrained decoders search the *allowed* captions by that score:
  beam search with a large beam returns the best allowed captions, exactly as enumerating only the
  allowed captions and ranking them by their true log-probabilities does. (Sampling draws from the
  allowed words renormalised, as any masked softmax does, but reports the true log-probability.)
- ``<unk>`` suppression (the default; ``allow_unk=True`` turns it off): ``<unk>`` is never emitted.
- ``block_bad_endings``: a caption may not end on a word of :data:`BAD_ENDINGS`. ``<end>`` is banned
  right after such a word; and because the ``max_len``-th word can only be followed by ``<end>``, a
  bad-ending word is banned as the ``max_len``-th word too. So no caption ends badly, finished or
  not: greedy and sampling cannot emit ``<end>`` after a bad word (they go on to a good one) and never
  stop at ``max_len`` on a bad word; beam search never spends a slot on a hypothesis that could only
  finish badly. The set of finished captions is exactly "at most ``max_len`` allowed words, the last
  (if any) not a bad ending, then ``<end>``"; the empty caption stays allowed.
- Escape hatch: a row in which every choice would be banned (only possible when the vocabulary has
  no word that may end a caption) gets ``<end>`` back, so decoding never chooses among -inf.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from captioner.data.tokenize import tokenize
from captioner.data.vocab import Vocabulary

# Words a caption must not end on: each needs something after it (a noun phrase, a clause), so a
# caption ending on one is a fragment ("a man riding a horse on the"). Chosen by word class, not by
# what a model happens to say; words that also end sentences normally are left out on purpose:
# particles/adverbs (up, down, out, off, over, around, inside, outside, above, below), "her" (also an
# object pronoun: "a man hugging her"), "that"/"this" (also demonstrative pronouns: "look at this").
BAD_ENDING_CLASSES: dict[str, frozenset[str]] = {
    "articles and determiners": frozenset("a an the every each another".split()),
    "possessives": frozenset("my your his its our their whose 's".split()),
    "prepositions": frozenset(
        """of with in on at to from by for into onto upon near under underneath beneath behind between through
        across along among amongst beside toward towards against during without about like than via""".split()
    ),
    "conjunctions": frozenset("and or but nor while as because if although though whereas so".split()),
    "relative pronouns": frozenset("who which".split()),
}
BAD_ENDINGS: frozenset[str] = frozenset().union(*BAD_ENDING_CLASSES.values())


def ends_badly(words: Sequence[str]) -> bool:
    """Whether a tokenised caption ends on a word of :data:`BAD_ENDINGS` (an empty caption does not)."""
    return bool(words) and words[-1].lower() in BAD_ENDINGS


def bad_ending_rate(captions: Iterable[str]) -> float:
    """Fraction of caption strings whose last token (the metrics' tokenizer) is a bad ending; 0.0 for none."""
    flags = [ends_badly(tokenize(c)) for c in captions]
    return sum(flags) / len(flags) if flags else 0.0


class DecodeMask:
    """Which choices each decoding step may make, for one vocabulary (see the module docstring)."""

    def __init__(self, vocab: Vocabulary, allow_unk: bool = False, block_bad_endings: bool = False,
                 bad_endings: Iterable[str] = BAD_ENDINGS):
        self.end_id = vocab.end_id
        self.V = len(vocab)
        banned = torch.zeros(self.V, dtype=torch.bool)  # (V,) never emitted
        if not allow_unk:
            banned[vocab.unk_id] = True
        bad = torch.zeros(self.V, dtype=torch.bool)  # (V,) words <end> may not follow
        if block_bad_endings:
            words = {w.lower() for w in bad_endings}
            for i, w in enumerate(vocab.words):
                bad[i] = w.lower() in words
        self.banned, self.bad = banned, bad
        self.blocks_endings = bool(bad.any())
        self.active = bool(banned.any()) or self.blocks_endings

    @classmethod
    def from_config(cls, vocab: Vocabulary, cfg: Any) -> DecodeMask:
        """The mask a DecodeConfig (or anything with ``allow_unk`` / ``block_bad_endings``) asks for."""
        return cls(vocab, allow_unk=getattr(cfg, "allow_unk", False), block_bad_endings=getattr(cfg, "block_bad_endings", False))

    def apply(self, log_probs: Tensor, prev: Tensor, t: int, max_len: int) -> Tensor:
        """Log-probs (R, V) of step ``t`` (0: the first word) with banned choices at -inf, given each row's previous word (R,)."""
        if not self.active:
            return log_probs
        dev = log_probs.device
        banned = self.banned.to(dev)  # (V,)
        if self.blocks_endings and t == max_len - 1:  # the max_len-th word: only <end> may follow it
            banned = banned | self.bad.to(dev)
        out = log_probs.masked_fill(banned, float("-inf"))  # (R, V) a copy: the caller's tensor is untouched
        if self.blocks_endings:
            ninf = torch.full_like(out[:, self.end_id], float("-inf"))  # (R,)
            out[:, self.end_id] = torch.where(self.bad.to(dev)[prev], ninf, out[:, self.end_id])  # no <end> after a bad word
            stuck = torch.isneginf(out).all(dim=1)  # (R,) nothing allowed: give <end> back
            out[:, self.end_id] = torch.where(stuck, log_probs[:, self.end_id], out[:, self.end_id])
        return out
