"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", arXiv:2112.11446, appendix A.1.1 and Table A1), as datatrove 0.10.x
implements them (`GopherQualityFilter`, `GopherRepetitionFilter`): same order of checks, same reasons.

Each filter returns None to keep a document or the name of the rule that drops it.
"""

from __future__ import annotations

import re

import numpy as np

from data.config import GopherQualityConfig, GopherRepetitionConfig
from data.filters.text import DocText

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
        counts = doc.counts  # datatrove's split_into_words, counted per chunk (no word list)
        n_words, n_non_symbol = counts.words, counts.non_symbol
        # A.1.1: fewer than 50 or more than 100,000 words.
        if c.min_doc_words and n_non_symbol < c.min_doc_words:
            return "gopher_short_doc"
        if c.max_doc_words and n_non_symbol > c.max_doc_words:
            return "gopher_long_doc"
        # A.1.1: mean word length outside 3..10 characters.
        avg = counts.non_symbol_chars / n_non_symbol if n_non_symbol else float("nan")
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
        if c.max_non_alpha_words_ratio and counts.alpha / n_words < c.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        # A.1.1: at least two of the stop words ("the, be, to, of, and, that, have, with": text.STOP_WORDS).
        if c.min_stop_words and counts.stop_words < c.min_stop_words:
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


_BASE = 0x100000001B3  # odd, so invertible modulo 2^64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def _concat_hashes(words: list[str], csum: np.ndarray):
    """A function n -> 64-bit polynomial hash of each window's words concatenated without spaces (datatrove
    `find_all_duplicate` compares "".join(words[i:i + n]), so ("ab", "c") equals ("a", "bc")). From prefix
    sums of c_j * B^-j over the document's characters: hash[a:e) = B^(e-1) * (Q[e] - Q[a]) mod 2^64, plus
    the length; equal strings get equal hashes, and the scan compares the strings themselves."""
    codes = np.frombuffer("".join(words).encode("utf-32-le"), np.uint32).astype(np.uint64) + np.uint64(1)
    length = len(codes)
    pw = np.full(length + 1, _BASE, np.uint64)
    pw[0] = 1
    pw = np.cumprod(pw)  # B^k mod 2^64 (uint64 products wrap)
    ipw = np.full(length, _BASE_INV, np.uint64)
    ipw[0] = 1
    q = np.zeros(length + 1, np.uint64)
    np.cumsum(codes * np.cumprod(ipw), out=q[1:])
    ends = csum.astype(np.int64)

    def hashes(n: int) -> np.ndarray:
        a, e = ends[: len(ends) - n], ends[n:]
        return (q[e] - q[a]) * pw[np.maximum(e - 1, 0)] ^ (e - a).astype(np.uint64) * np.uint64(
            0x9E3779B97F4A7C15
        )

    return hashes


def _repeated_positions(h: np.ndarray) -> list[int]:
    """Positions (ascending) whose hash occurs at least twice: one sort, equal neighbours marked."""
    order = np.argsort(h)
    eq = h[order[1:]] == h[order[:-1]]
    if not eq.any():
        return []
    mark = np.zeros(len(h), bool)
    mark[:-1] |= eq
    mark[1:] |= eq
    return np.sort(order[mark]).tolist()


def _repeated(h: np.ndarray, among: np.ndarray | None, first: bool) -> tuple[np.ndarray, int, int]:
    """(positions whose n-gram repeats, the highest count, the first position with that count)."""
    pos = np.arange(len(h)) if first or among is None else among[among < len(h)]
    if not len(pos):
        return pos, 1, 0  # every n-gram occurs once: Counter's first key, position 0
    _, first_at, inverse, counts = np.unique(
        h[pos], return_index=True, return_inverse=True, return_counts=True
    )
    top = int(counts.max())
    if top == 1:
        return pos[:0], 1, 0
    return pos[counts[inverse] > 1], top, int(pos[first_at[counts == top].min()])


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
        # Positions whose n-gram occurs twice or more are a subset of those whose (n-1)-gram does (an
        # equal n-gram starts with an equal (n-1)-gram), so after the first n only those are grouped.
        rep = None  # positions whose previous (n-1)-gram repeats; None = all positions
        for n, frac in self.top:
            if len(words) < n:
                continue
            rep, top, i = _repeated(_ngram_hashes(ids, n), rep, n == self.top[0][0])
            chars = int(csum[i + n] - csum[i]) + (n - 1)
            if chars * top / len(text) > frac:
                return f"top_{n}_gram"
        # Table A1: duplicate 5..10-gram character fraction 0.15..0.10: characters of n-grams (words
        # joined without spaces) seen before, scanning left to right and skipping a matched n-gram
        # (datatrove `find_all_duplicate`). Only positions whose n-gram occurs twice can match, so the
        # scan visits just those, in order: an n-gram matches when an earlier equal one was visited (the
        # first visited one entered the seen set), and a match skips the next n - 1 positions.
        concat = None
        for n, frac in self.dup:
            if len(words) < n:
                continue
            concat = _concat_hashes(words, csum) if concat is None else concat
            cand = _repeated_positions(concat(n))
            if not cand:
                continue
            cl = csum.tolist()
            limit = frac * len(text)
            seen: set[str] = set()
            repeated, frontier = 0, 0
            for p in cand:
                if p < frontier:
                    continue
                gram = "".join(words[p : p + n])
                if gram in seen:
                    repeated += cl[p + n] - cl[p]
                    if repeated > limit and repeated / len(text) > frac:
                        return f"duplicated_{n}_n_grams"  # the count only grows: decided
                    frontier = p + n
                else:
                    seen.add(gram)
        return None
