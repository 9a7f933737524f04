"""What the quality filters share: the word tokenizer, punctuation sets, and a per-document view that
tokenizes once for every filter.

Words are spaCy's English rule-based tokenizer (`spacy.blank("en").tokenizer`), the same tokens datatrove
0.10.x's `split_into_words(text, "en")` yields (it runs that tokenizer plus a sentencizer), with
whitespace-only tokens dropped and the rest stripped (datatrove `strip_strings`). Sentences follow spaCy's
rule-based `Sentencizer`, which datatrove's `split_into_sentences` uses. Calling the tokenizer alone (no
pipeline, no sentencizer) and once per document for all filters is most of the speed-up over datatrove.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

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
    import spacy

    return spacy.blank("en")


@lru_cache(maxsize=1)
def _sentence_punct() -> frozenset[str]:
    from spacy.pipeline import Sentencizer

    return frozenset(Sentencizer.default_punct_chars)


def spacy_tokens(text: str):
    """spaCy's English tokenizer output (a Doc) for `text`."""
    tok = _nlp().tokenizer
    return tok(text)


def split_words(text: str) -> list[str]:
    """datatrove's `split_into_words(text, "en")`: spaCy tokens, stripped, whitespace-only ones dropped."""
    from spacy.attrs import IDX, LENGTH

    out = []
    for start, length in spacy_tokens(text).to_array([IDX, LENGTH]).tolist():  # no Token objects
        s = text[start : start + length].strip()
        if s:
            out.append(s)
    return out


def count_sentences(text: str) -> int:
    """len(datatrove `split_into_sentences(text, "en")`): sentences by spaCy's Sentencizer rule (a new
    sentence starts at the first non-punctuation token after a sentence-final mark). Text without any
    sentence-final character is one sentence and is never tokenized."""
    punct = _sentence_punct()
    if not any(c in punct for c in text):
        return 1
    doc = spacy_tokens(text)
    if len(doc) == 0:
        return 1  # datatrove's split yields [text] when the tokenizer finds no sentence
    starts = 1
    seen_period = False
    for token in doc:
        in_punct = token.text in punct
        if seen_period and not token.is_punct and not in_punct:
            starts += 1
            seen_period = False
        elif in_punct:
            seen_period = True
    return starts


@lru_cache(maxsize=1 << 20)
def word_traits(word: str) -> tuple[bool, bool]:
    """(has a character outside PUNCTUATION_SET, has an alphabetic character), cached per distinct word."""
    return any(ch not in PUNCTUATION_SET for ch in word), any(ch.isalpha() for ch in word)


class DocText:
    """A document's text with its words computed once, on first use, for every filter that needs them."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return split_words(self.text)
