"""The one tokenizer used for training text and for metrics.

It reproduces what the COCO caption evaluation (pycocoevalcap) does to raw text:
Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase``, then the
tokens in pycocoevalcap's ``PUNCTUATIONS`` list are dropped. The rules below are a
pure-Python re-implementation of the parts of that lexer that matter for English
captions, so no Java process or downloaded data is needed at run time.

Consequences worth knowing (all inherited from the COCO pipeline, on purpose):
brackets become the words ``-lrb-``/``-rrb-``/``-lsb-``/``-rsb-``/``-lcb-``/``-rcb-``
(pycocoevalcap only drops the upper-case forms, which ``-lowerCase`` never emits);
runs such as ``!!!`` or ``?!`` and symbols such as ``$ % & / * +`` stay as tokens;
known abbreviations and acronyms keep their period (``mr.``, ``st.``, ``u.s.``, ``a.``);
a missing space after a period glues words (``trick.the``); ``can't`` -> ``ca n't``.

tests/test_metrics.py checks the output against the real jar on ordinary captions.
Known differences, none of them in ordinary captions: HTML/SGML tags, ``a@b``,
``a<b``, a hyphen right after an abbreviation (``etc.-x``), dotted words ending in an
abbreviation (``two.st.``), the space-joined fraction ``5 7/8`` and phone numbers.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Optional

# pycocoevalcap's PUNCTUATIONS list, verbatim: tokens dropped after tokenising.
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Character classes. Python's \w also matches '_' and non-decimal digits, so
# letters are spelled as "word character that is not a digit or underscore";
# combining accents count as letters the way the Java lexer counts them.
_L = r"(?:[^\W\d_]|[\u0300-\u036f])"
_A = r"(?:[^\W_]|[\u0300-\u036f])"
# Apostrophes: the lexer accepts the curly right quote wherever it accepts "'",
# and inside some words also the left/reversed single quotes.
_APOS = "['\u2019]"
_APOS_ETC = "['\u2019\u2018\u201b]"

# Abbreviations that keep their period anywhere (case-insensitive) ...
_ABBREV = frozenset(
    """
    mon tue tues wed thu thurs fri jan feb mar apr jun jul aug sep sept oct nov dec
    ala ariz calif colo conn dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt
    wis wisc wyo inc co cos corp pty ptys ppty pptys plc bancorp dept bhd assn univ intl sys ph tel est ext
    sq bros esq seq al etc jr sr blvd rd ltd ft bldg prof profs sen sens rep reps atty attys lt col gen
    messrs gov govs adm rev maj sgt cpl pvt capt ste st pres lieut hon brig cmdr comdr pfc spc supt supts
    det dr drs mr mrs ms mt ave vs alex wm jos cie cf treas invt elec natl mfg mtg
    """.split()
)
# ... only when capitalised, because the lower-case forms are ordinary words ...
_ABBREV_CAPITAL = frozenset("ark ill mass miss ore wash del la pa tex".split())
# ... and only when a number follows ("no. 5", "fig. 2").
_ABBREV_BEFORE_DIGIT = frozenset("no nos fig figs art op prop ca pp".split())

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CHAR_MAP = {"£": "#", "€": "$", "¤": "$", "₠": "$", "¢": "cents"}
_FRACTIONS = {"¼": "1/4", "½": "1/2", "¾": "3/4", "⅓": "1/3"}


def _fold_table() -> dict[int, str]:
    """Characters rewritten before scanning, so that the rules below stay simple."""
    # Dashes and the ellipsis character are separate tokens in their ASCII spelling.
    table = {"\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ", "\u2026": " ... "}
    # Numeric characters that are not decimal digits (superscripts, fractions) are
    # symbols to the Java lexer but \w to Python's re: make them separate chunks.
    for code in range(0x80, 0x10000):
        ch = chr(code)
        if ch.isnumeric() and not ch.isdecimal():
            table[ch] = f" {_FRACTIONS.get(ch, ch)} "
    return str.maketrans(table)


_FOLD = _fold_table()

# One scanning rule: a regex tried at the current position, and a function of the
# match giving (length compared for longest match, characters consumed, token or None).
_Action = Callable[[re.Match], tuple[int, int, Optional[str]]]


def _whole(m: re.Match) -> tuple[int, int, Optional[str]]:
    n = m.end() - m.start()
    return n, n, m.group(0)


def _head(m: re.Match) -> tuple[int, int, Optional[str]]:
    # Trailing-context rules: the context counts for the longest-match choice
    # (as in JFlex's r1/r2), but only group 1 is emitted and consumed.
    return m.end() - m.start(), len(m.group(1)), m.group(1)


def _as(token: str) -> _Action:
    def emit(m: re.Match) -> tuple[int, int, Optional[str]]:
        n = m.end() - m.start()
        return n, n, token

    return emit


def _ascii_apostrophe(m: re.Match) -> tuple[int, int, Optional[str]]:
    # Clitics ('s, n't) are normalised to the ASCII apostrophe; words keep theirs.
    n = m.end() - m.start()
    return n, n, m.group(0).replace("\u2019", "'")


def _abbreviation(m: re.Match) -> tuple[int, int, Optional[str]]:
    word = m.group(1)
    low = word.lower()
    n = m.end() - m.start()
    if (
        low in _ABBREV
        or (low in _ABBREV_CAPITAL and word[0].isupper())
        or (low in _ABBREV_BEFORE_DIGIT and _DIGIT_AHEAD.match(m.string, m.end()) is not None)
    ):
        return n, n, m.group(0)
    return 0, 0, None


# Capitalised words that make the lexer read "x. Word" as a sentence end after "x".
_SENTENCE_OPENERS = frozenset(
    "a after an as at but he her here however if in it many now one our she since so some that the their"
    " then there these they this we what when while yet you".split()
)


def _letter_before_opener(m: re.Match) -> tuple[int, int, Optional[str]]:
    if m.group(2).lower() in _SENTENCE_OPENERS:
        return m.end(2) - m.start(), 1, m.group(1)  # the context counts, so this beats "x."
    return 0, 0, None


def _push_back(k: int) -> _Action:
    # "cannot" -> "can" "not", "gonna" -> "gon" "na": emit all but the last k characters.
    def emit(m: re.Match) -> tuple[int, int, Optional[str]]:
        n = m.end() - m.start()
        return n, n - k, m.group(0)[: n - k]

    return emit


def _rules() -> list[tuple[re.Pattern, _Action]]:
    """The lexer's rules, tried at every position; the longest match wins, ties go to the earlier rule."""
    c = lambda p: re.compile(p, re.IGNORECASE)  # noqa: E731
    cs = re.compile  # case-sensitive, where the Java lexer's character classes are
    ap, ape = _APOS, _APOS_ETC
    thing_part = rf"(?:[dol]{ape}{_A})?{_A}+"
    acro = r"[A-Za-z](?:\.[A-Za-z])*"
    acro2 = r"[A-Za-z](?:\.[A-Za-z])+"
    return [
        (c(r"cannot"), _push_back(3)),
        (c(r"gonna|gotta|lemme|gimme|wanna"), _push_back(2)),
        (c(r"'tis"), _push_back(2)),
        (cs(r"c\+\+|[cCfF]#"), _whole),
        # word followed by a clitic ('s 'm 'd 're 've 'll) or by n't
        (c(rf"({_L}+){ap}(?:[msd]|re|ve|ll)"), _head),
        (c(rf"({_L}*[^\W\d_nN])n{ape}t"), _head),
        # a clitic on its own: after an ASCII apostrophe only when no letter follows
        # ("abc'def" is a quoted "def"), after a curly one always ("x’sitting" -> 's itting)
        (c(rf"'(?:[msd]|re|ve|ll)(?!{_L})|\u2019(?:[msd]|re|ve|ll)"), _ascii_apostrophe),
        (c(rf"n{ape}t"), lambda m: (3, 3, "n't")),
        # words, hyphenated words, numbers, dotted words (missing space after a period)
        (c(rf"{thing_part}(?:[-_]{thing_part})*"), _whole),
        (c(rf"[a-z0-9][a-z0-9.,]*(?:-(?:{acro2}\.|[a-z0-9]+))+"), _whole),
        (c(r"[a-z0-9]+(?:-[a-z]+){0,2}(?:/[a-z0-9]+(?:-[a-z]+){0,2}){1,2}"), _whole),
        (cs(r"[A-Z]+(?:[+&][A-Z]+)+"), _whole),
        (c(rf"{_L}{_A}*(?:[.!?]{_L}{_A}*)+"), _whole),
        (c(r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)"), _whole),
        (c(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"), _whole),
        (c(r"(?:\d{1,4}-)?\d{1,4}/\d{1,4}"), _whole),
        # words with an apostrophe that the lexer keeps whole
        (c(rf"'n'|\u2019n\u2019?|(?:[ldj]|ol){ap}(?!{_L})|{ap}em|{ap}till?|{ap}cause|{ap}[2-9]0s|{ap}\d\d(?=\s|$)"), _whole),
        (cs(rf"{_L}+[aeiouyAEIOUY]{ape}[aeiouA-Z]{_L}*"), _whole),
        (cs(rf"[A-HJ-XZn]{ape}{_L}{{2,}}"), _whole),
        (c(rf"(y{ap})(?={_L})"), _head),
        # abbreviations and acronyms keep their period
        (c(rf"({_L}+)\."), _abbreviation),
        (c(rf"{acro}\.|(?:ed|ph)\.d\."), _whole),
        # ... except a single letter before a capitalised sentence opener ("x. The")
        (cs(r"([A-Za-z])\.(?=\s+([A-Z][A-Za-z]*)(?:\s|$))"), _letter_before_opener),
        # URLs, e-mail addresses, @names and #tags stay whole
        (c(r"(?:https?|ftp)://[^\s\"<>|(){}\[\]]*[^\s\"'<>|.!?(){},;:&\[\]-]"), _whole),
        (c(r"www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-z]{2,4}|(?:[^\s\"`'<>|.!?(){},_$-]+\.)+(?:com|net|org|edu)"), _whole),
        (c(r"[a-z0-9._%+-]+@[a-z0-9][a-z0-9.-]*[a-z0-9]"), _whole),
        (c(r"@[a-z_][a-z_0-9]*"), _whole),
        (c(rf"#{_L}(?:{_A}|_)*{_A}"), _whole),
        # punctuation and symbols; every kind of quote ends up in COCO's dropped list
        (c(r"\.\.\.+"), _as("...")),
        (c(r"-{2,4}"), _as("--")),  # longer runs of hyphens stay as they are
        (c(r"-{5,}"), _whole),
        (c(r"[?!]+|[-,;:.`]|''|``"), _whole),
        (c("[\"\u201c\u201d\u201e\u201f\u00ab\u00bb]|&quot;"), _as("''")),
        (c("['\u2018\u2019\u201a\u201b]"), _as("'")),
        (c(r"&amp;"), _as("&")),
        (c(r"&lt;"), _as("<")),
        (c(r"&gt;"), _as(">")),
        (c(r"[a-z]*\$"), _whole),
        (c(r"\*+|@+|#+|_+"), _whole),
    ]


_RULES = _rules()
_DIGIT_AHEAD = re.compile(r"\s*\d")
# Plain words that the lexer still splits.
_ASSIMILATIONS = frozenset("cannot gonna gotta lemme gimme wanna".split())


def _scan(text: str, end: int) -> list[str]:
    """PTB tokens of ``text[:end]``, a whitespace-free chunk; ``text[end:]`` is only looked at."""
    out: list[str] = []
    pos = 0
    while pos < end:
        best_len, best_used, best_tok = 0, 0, None
        for rx, action in _RULES:
            m = rx.match(text, pos)
            if m is None:
                continue
            length, used, tok = action(m)
            # Rules may look past the chunk (for context) but never consume past it.
            if length > best_len and 0 < used <= end - pos:
                best_len, best_used, best_tok = length, used, tok
        if best_tok is None:
            ch = text[pos]
            best_used = 1
            if ch in _BRACKETS:
                best_tok = _BRACKETS[ch]
            elif ch in _CHAR_MAP:
                best_tok = _CHAR_MAP[ch]
            elif "\ud800" <= ch <= "\udfff" or ord(ch) > 0xFFFF:
                best_tok = None  # the 16-bit Java lexer drops what it cannot tokenize (emoji)
            else:
                best_tok = ch
        if best_tok is not None:
            out.append(best_tok)
        pos += best_used
    return out


@lru_cache(maxsize=1 << 16)
def _scan_chunk(chunk: str, following: str) -> tuple[str, ...]:
    """Lower-cased PTB tokens of one chunk; ``following`` is the next chunk, when it can matter."""
    text = f"{chunk} {following}" if following else chunk
    return tuple(t.lower() for t in _scan(text, len(chunk)))


def ptb_tokens(text: str) -> list[str]:
    """Split ``text`` like the Java PTBTokenizer (one line, -lowerCase), keeping punctuation tokens."""
    chunks = text.translate(_FOLD).split()
    out: list[str] = []
    for i, chunk in enumerate(chunks):
        if chunk.isalnum():  # fast path: most chunks are plain words
            low = chunk.lower()
            if low not in _ASSIMILATIONS:
                out.append(low)
                continue
        # Only a chunk ending in "." depends on what follows ("no. 5", "x. The").
        following = chunks[i + 1] if chunk[-1] == "." and i + 1 < len(chunks) else ""
        out.extend(_scan_chunk(chunk, following))
    return out


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into PTB tokens, dropping COCO's punctuation tokens."""
    return [t for t in ptb_tokens(text) if t not in PUNCTUATION]
