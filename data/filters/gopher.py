"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", arXiv:2112.11446, appendix A.1.1 and Table A1), as datatrove 0.10.x
implements them (`GopherQualityFilter`, `GopherRepetitionFilter`): same order of checks, same reasons.

Each filter returns None to keep a document or the name of the rule that drops it.
"""

from __future__ import annotations

import re

import numpy as np

from data.config import GopherQualityConfig, GopherRepetitionConfig
from data.filters.text import DocText, word_stats

# Gopher's stop words (A.1.1: "the, be, to, of, and, that, have, with"; a document needs at least two).
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")
_MASK = (1 << 64) - 1


class GopherQuality:
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig) -> None:
        self.cfg = cfg

    def __call__(self, doc: DocText) -> str | None:
        c = self.cfg
        text = doc.text
        words = doc.words
        n_words = len(words)
        n_non_symbol, total_length, n_alpha = word_stats(words)
        # A.1.1: fewer than 50 or more than 100,000 words.
        if c.min_doc_words and n_non_symbol < c.min_doc_words:
            return "gopher_short_doc"
        if c.max_doc_words and n_non_symbol > c.max_doc_words:
            return "gopher_long_doc"
        # A.1.1: mean word length outside 3..10 characters.
        avg = total_length / n_non_symbol if n_non_symbol else float("nan")
        if c.min_avg_word_length and avg < c.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if c.max_avg_word_length and avg > c.max_avg_word_length:
            return "gopher_above_avg_threshold"
        # A.1.1: symbol-to-word ratio above 0.1 for the hash symbol or the ellipsis.
        if c.max_symbol_word_ratio and text.count("#") / n_words > c.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (
            c.max_symbol_word_ratio
            and (text.count("...") + text.count("\u2026")) / n_words > c.max_symbol_word_ratio
        ):
            return "gopher_too_many_ellipsis"
        # A.1.1: more than 90% of lines starting with a bullet, or more than 30% ending with an ellipsis.
        lines = text.splitlines()
        if c.max_bullet_lines_ratio:
            bullets = sum(s.lstrip().startswith(("\u2022", "-")) for s in lines)
            if bullets / len(lines) > c.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
        if c.max_ellipsis_lines_ratio:
            ends = sum(s.rstrip().endswith(("...", "\u2026")) for s in lines)
            if ends / len(lines) > c.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"
        # A.1.1: at least 80% of words contain an alphabetic character.
        if c.max_non_alpha_words_ratio and n_alpha / n_words < c.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        # A.1.1: at least two of the stop words.
        if c.min_stop_words and len(STOP_WORDS.intersection(words)) < c.min_stop_words:
            return "gopher_enough_stop_words"
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated elements, characters in repeated elements), counting every occurrence after the first."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of each window of n word ids: (len(ids) - n + 1,) uint64."""
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(1_000_003) + ids[k : k + m]
    return h


class GopherRepetition:
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig) -> None:
        self.cfg = cfg
        self.top = sorted((int(n), float(f)) for n, f in cfg.top_n_grams.items())
        self.dup = sorted((int(n), float(f)) for n, f in cfg.dup_n_grams.items())

    def __call__(self, doc: DocText) -> str | None:
        c = self.cfg
        text = doc.text
        if not text:
            return "empty"
        # Table A1: duplicate paragraph fraction 0.30, duplicate paragraph character fraction 0.20.
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup, chars = _duplicates(paragraphs)
        if c.dup_para_frac and dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if c.dup_para_char_frac and chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        # Table A1: duplicate line fraction 0.30, duplicate line character fraction 0.20.
        lines = _LINES.split(text)
        dup, chars = _duplicates(lines)
        if c.dup_line_frac and dup / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if c.dup_line_char_frac and chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"

        words = doc.words
        if not words:
            return None
        # Word ids: Python's 64-bit string hash (like the n-gram hash below, a collision is ~1e-10 likely
        # per document), mapped in C rather than through a per-document vocabulary.
        ids = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
        lens = np.fromiter(map(len, words), np.int64, len(words))
        csum = np.concatenate([[0], np.cumsum(lens)])  # characters of words[a:b] = csum[b] - csum[a]
        # Table A1: top 2/3/4-gram character fraction 0.20/0.18/0.16. The n-gram string is the words
        # joined by spaces; datatrove takes the first most frequent one (Counter.most_common(1)).
        for n, frac in self.top:
            if len(words) < n:
                continue
            h = _ngram_hashes(ids, n)
            _, first, counts = np.unique(h, return_index=True, return_counts=True)
            top = counts.max()
            i = int(first[counts == top].min())
            chars = int(csum[i + n] - csum[i]) + (n - 1)
            if chars * int(top) / len(text) > frac:
                return f"top_{n}_gram"
        # Table A1: duplicate 5..10-gram character fraction 0.15..0.10: characters of words (joined
        # without spaces) in n-grams seen before, scanning left to right and skipping a matched n-gram.
        cl = None
        for n, frac in self.dup:
            if len(words) < n:
                continue
            h = _ngram_hashes(ids, n)
            uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
            if len(uniq) == len(h):
                continue  # no repeated n-gram at all: nothing counted
            # Up to the first n-gram that occurred before, every n-gram is new: start the scan there.
            start = int(np.argmax(first[inverse] < np.arange(len(h))))
            hl = h.tolist()
            cl = csum.tolist() if cl is None else cl
            seen = set(hl[:start])
            limit = frac * len(text)
            repeated, idx, m = 0, start, len(hl)
            while idx < m:
                if hl[idx] in seen:
                    repeated += cl[idx + n] - cl[idx]
                    if repeated > limit and repeated / len(text) > frac:
                        return f"duplicated_{n}_n_grams"  # the count only grows: decided
                    idx += n
                else:
                    seen.add(hl[idx])
                    idx += 1
        return None
