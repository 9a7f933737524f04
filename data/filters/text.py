"""What the quality filters share: punctuation sets, sentence counts, word counts, and a per-document view
that tokenizes once for every filter.

Words are datatrove 0.10.x's `split_into_words(text, "en")` (spaCy's English tokenizer, made fast in
`data/filters/tokens.py`). Sentences follow spaCy's rule-based `Sentencizer`, which datatrove's
`split_into_sentences` uses. Everything derived from a chunk's tokens (its sentence steps, its word counts)
is cached per chunk too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from data.filters import _chunks
from data.filters.tokens import (
    _special_if_letters_whole,
    chunk_tokens,
    clear_token_caches,
    ensure_tokens,
    spaced_words,
)

# datatrove/utils/text.py PUNCTUATION (symbols, CJK brackets and C0/C1 control characters) and
# TERMINAL_PUNCTUATION (sentence-final marks of many scripts), copied so decisions match datatrove's.
PUNCTUATION = (
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a"
    "\u201e';\u2019{|\u2236\xb4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\xab\u3009,><\u300b)?\uff09"
    '\u3002\u2026@_."}\u25ba\xbb'
) + "".join(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a"
    "\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8"
    "\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048"
    "\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8"
    "\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56"
    "\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89"
    "\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5"
    "\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b"
    "\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf"
    "\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642"
    "\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41"
    "\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38"
    "\U00016b44\U00016e98\U0001bc9f\U0001da88"
)
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION


@lru_cache(maxsize=1)
def _nlp():
    """spaCy's blank English pipeline: its vocabulary's lexical attributes (is_punct, ...)."""
    import spacy

    return spacy.blank("en")


@lru_cache(maxsize=1)
def _sentence_punct() -> frozenset[str]:
    from spacy.pipeline import Sentencizer

    return frozenset(Sentencizer.default_punct_chars)


@lru_cache(maxsize=1 << 16)
def _is_punct(token: str) -> bool:
    return bool(_nlp().vocab[token].is_punct)


_WS_RUN = re.compile(r"(\s+)")
_CACHE_LIMIT = 2_000_000  # entries per cache below; each is emptied when full (its values are recomputable)
_STEPS: dict[str, tuple[int, bool, int, bool]] = {}


def _sentence_steps(piece: str) -> tuple[int, bool, int, bool]:
    """What one piece of a line (a chunk, or a whitespace run: spaCy makes a token of it, less its first
    character when that is a plain space) does to the Sentencizer's state: (sentence starts, seen a
    sentence-final mark after it) entering without and with a pending mark. Cached per piece."""
    steps = _STEPS.get(piece)
    if steps is None:
        if piece[0].isspace():
            rest = piece[1:] if piece[0] == " " else piece
            tokens = (rest,) if rest else ()
        else:
            tokens = chunk_tokens(piece)
        punct = _sentence_punct()
        out: list = []
        for seen in (False, True):
            starts = 0
            for token in tokens:
                if token in punct:
                    seen = True
                elif seen and not _is_punct(token):
                    starts += 1
                    seen = False
            out += [starts, seen]
        if len(_STEPS) >= _CACHE_LIMIT:
            _STEPS.clear()
        steps = _STEPS[piece] = tuple(out)
    return steps


def count_sentences(text: str) -> int:
    """len(datatrove `split_into_sentences(text, "en")`) for a stripped line: sentences by spaCy's
    Sentencizer rule (a new sentence starts at the first token after a sentence-final mark that is
    neither such a mark nor punctuation). Text without any sentence-final character is one sentence.
    The rule is a two-state machine, so each chunk's effect on it is computed once (`_sentence_steps`)."""
    if _sentence_punct().isdisjoint(text):
        return 1
    starts, seen = 1, False
    get = _STEPS.get
    for piece in _WS_RUN.split(text):
        if piece:
            steps = get(piece) or _sentence_steps(piece)
            if seen:
                starts += steps[2]
                seen = steps[3]
            else:
                starts += steps[0]
                seen = steps[1]
    return starts


# Gopher's stop words (Rae et al. 2021, A.1.1: "the, be, to, of, and, that, have, with"), counted per chunk
# with the other word counts so that GopherQuality never needs a document's word list.
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_CHUNK_COUNTS: dict[str, bytes] = {}  # chunk -> its counts, packed by data/filters/_chunks.c


@dataclass(frozen=True)
class WordCounts:
    """What GopherQuality (and FineWeb's line ratio) need of a document's words (datatrove
    `split_into_words`), without the words themselves."""

    words: int
    non_symbol: int  # words with a character outside PUNCTUATION_SET
    non_symbol_chars: int  # the total length of those words
    alpha: int  # words with an alphabetic character
    stop_words: int  # how many of STOP_WORDS occur


def _tokens_of(chunks: list[str]) -> list[tuple[str, ...]]:
    cache = ensure_tokens(set(chunks))
    return list(map(cache.__getitem__, chunks))


@lru_cache(maxsize=1)
def _counter():
    _chunks.setup("".join(PUNCTUATION_SET), STOP_WORDS)
    return _chunks.count


def word_counts(text: str) -> WordCounts:
    """The document's word counts, summed in C over its chunks' counts; a chunk's counts are computed
    once, from its tokens, or as one word for a chunk of letters that is no special case (`_chunks.c`)."""
    return WordCounts(*_counter()(text, _CHUNK_COUNTS, _special_if_letters_whole(), _tokens_of, _CACHE_LIMIT))


def clear_caches() -> None:
    """Forget every cached chunk, sentence step and count (benchmarks measure a cold
    start)."""
    clear_token_caches()
    _STEPS.clear()
    _CHUNK_COUNTS.clear()


class DocText:
    """A document's text with its words computed once, on first use, for every filter that needs them."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def spaced(self) -> str:
        """The words joined by " " (`spaced_words`), what GopherRepetition hashes."""
        return spaced_words(self.text)

    @cached_property
    def counts(self) -> WordCounts:
        return word_counts(self.text)
