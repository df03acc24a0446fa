"""The one tokenizer used for training text and for metrics.

It follows what the COCO caption evaluation does for plain English: the Stanford
PTB tokenizer with lower-casing, then the tokens in its punctuation list are
dropped. nltk's Treebank tokenizer implements the same Penn Treebank rules in
pure Python and needs no downloaded data, so nothing has to be fetched at run time.
"""

from __future__ import annotations

import re
from functools import lru_cache

from nltk.tokenize import TreebankWordTokenizer

# pycocoevalcap's PUNCTUATIONS list, plus the raw bracket forms nltk emits where
# the Java tokenizer emits -LRB- and friends.
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
    + ["(", ")", "{", "}", "[", "]", "-lrb-", "-rrb-", "-lcb-", "-rcb-", "-lsb-", "-rsb-", '"']
)

_WHITESPACE = re.compile(r"\s+")


@lru_cache(maxsize=1)
def _treebank() -> TreebankWordTokenizer:
    return TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into PTB tokens, dropping COCO's punctuation tokens."""
    text = _WHITESPACE.sub(" ", text.replace("\n", " ")).strip().lower()
    if not text:
        return []
    tokens = _treebank().tokenize(text)
    return [t for t in tokens if t not in PUNCTUATION]
