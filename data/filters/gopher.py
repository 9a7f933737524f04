"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", arXiv:2112.11446, appendix A.1.1 and Table A1), as datatrove 0.10.x
implements them (`GopherQualityFilter`, `GopherRepetitionFilter`): same order of checks, same reasons.

Each filter returns None to keep a document or the name of the rule that drops it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from data.config import GopherQualityConfig, GopherRepetitionConfig
from data.filters.text import DocText


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
    """(repeated elements, characters in repeated elements), counting every occurrence after the first
    (datatrove `find_duplicates`): everything but one copy of each distinct element, counted in C."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


def _paragraphs(text: str) -> list[str]:
    """`re.split(r"\\n{2,}", text.strip())` (datatrove's paragraphs) by `str.split`: splitting on "\\n\\n"
    cuts a run of k newlines into k // 2 separators, leaving k // 2 - 1 empty pieces and, for odd k, one
    newline at the start of the next piece; dropping those gives the regex's pieces."""
    text = text.strip()
    pieces = text.split("\n\n")
    if "\n\n\n" not in text:
        return pieces  # every run is exactly two newlines
    return [p[1:] if p[0] == "\n" else p for p in pieces if p] or [""]


def _lines(text: str) -> list[str]:
    """`re.split("\\n+", text)` (datatrove's lines) by `str.split`: a run of k newlines leaves k - 1 empty
    pieces between its neighbours; the regex keeps only the first and last piece when empty."""
    parts = text.split("\n")
    if len(parts) < 3 or "\n\n" not in text:
        return parts
    return [parts[0], *[p for p in parts[1:-1] if p], parts[-1]]


_BASE = 0x100000001B3  # odd, so invertible modulo 2^64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_WORD_BASE = np.uint64(1_000_003)
# Hashes are kept times _SCALE = an odd constant * 2^20: the low 20 bits are free to hold a position
# (see _runs), and the multiplication moves differences in a polynomial hash's low bits (the last
# character's) up into the bits kept.
_POS_BITS = 20
_SCALE = np.uint64((0x9E3779B97F4A7C15 << _POS_BITS) & ((1 << 64) - 1))
_POWERS = (np.ones(1, np.uint64), np.ones(1, np.uint64))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(_SCALE * B^k, B^-k) mod 2^64 for k < at least n (uint64 products wrap), kept across documents."""
    global _POWERS
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]), 1 << 14)
        pw, ipw = np.full(size, _BASE, np.uint64), np.full(size, _BASE_INV, np.uint64)
        pw[0] = ipw[0] = 1
        _POWERS = (np.cumprod(pw) * _SCALE, np.cumprod(ipw))
    return _POWERS


def _char_prefix(spaced: str, n_words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(csum, q, pw) over the words concatenated without spaces, from the words joined by spaces (words
    hold no whitespace): word a..b-1 spans characters csum[a]..csum[b]-1, and the 64-bit polynomial hash
    of characters a..e-1 is pw[e-1] * (q[e] - q[a]) mod 2^64, with q the prefix sums of c_j * B^-j and
    pw[k] = _SCALE * B^k (equal strings, equal hashes). One encode for the whole document."""
    codes = np.frombuffer(spaced.encode("utf-32-le", "surrogatepass"), np.uint32)
    space = codes == 32
    cuts = np.flatnonzero(space)
    codes = codes[~space] + np.uint64(1)  # no character hashes to 0
    length = len(codes)
    csum = np.empty(n_words + 1, np.int64)
    csum[0], csum[-1] = 0, length
    np.subtract(cuts, np.arange(n_words - 1), out=csum[1:-1])  # word i starts after i separators
    pw, ipw = _powers(length + 1)
    q = np.zeros(length + 1, np.uint64)
    np.cumsum(codes * ipw[:length], out=q[1:])
    return csum, q, pw


def _runs(h: np.ndarray, at: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of h (rows, k; sorted in place), hashes times _SCALE of the n-grams at positions
    `at` (k,), by hash and then position, and find the runs of equal hashes. The position fills the
    key's low `bits` bits, so one plain sort (far cheaper than an argsort) does both. Returns, in sorted
    order, (the positions, whether each starts its run), each (rows, k)."""
    rows, k = h.shape
    low = np.uint64((1 << bits) - 1)
    if bits > _POS_BITS:  # over 2^20 words: the hash gives up more bits
        h &= ~low
    h |= at
    h.sort(axis=1)
    pos = h & low
    h >>= np.uint64(bits)
    start = np.empty((rows, k), bool)
    start[:, 0] = True
    np.not_equal(h[:, 1:], h[:, :-1], out=start[:, 1:])
    return pos, start


def _run_sizes(start: np.ndarray) -> np.ndarray:
    """The size of each element's run, from the run starts (rows, k) of _runs."""
    rows, k = start.shape
    starts = np.flatnonzero(start)
    sizes = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=sizes[:-1])
    sizes[-1] = rows * k - starts[-1]
    return np.repeat(sizes, sizes).reshape(rows, k)


def _gram_hashes(
    csum: np.ndarray, q: np.ndarray, pw: np.ndarray, top: list[int], dups: list[int]
) -> np.ndarray:
    """(len(top) + len(dups), n_words) uint64, hashes times _SCALE of the n-grams at each position. Top
    rows: the words as a tuple, a polynomial in word ids (each word's character hash; h_n = h_(n-1) *
    B + ids[n - 1:]), with distinct filler ids past the last word. Duplicate rows: the characters of the
    words concatenated, cut at the last word (positions past the last n-gram are never used)."""
    n_words = len(csum) - 1
    qe, pe = q[csum], pw[csum - 1]  # at word boundary e: q[e], and pw[e - 1] (times 0 where e is 0)
    qa = qe[:n_words]
    h = np.empty((len(top) + len(dups), n_words), np.uint64)
    if dups:
        e = np.minimum(np.arange(n_words) + np.array(dups)[:, None], n_words)  # (len(dups), n_words)
        np.subtract(qe[e], qa, out=h[len(top) :])
        h[len(top) :] *= pe[e]
    if top:
        ids = np.empty(n_words + top[-1] - 1, np.uint64)
        np.subtract(qe[1 : n_words + 1], qa, out=ids[:n_words])
        ids[:n_words] *= pe[1 : n_words + 1]
        ids[n_words:] = np.arange(1, top[-1], dtype=np.uint64) * _SCALE
        g, k = ids[:n_words], 1
        for r, n in enumerate(top):
            while k < n:
                g = np.multiply(g, _WORD_BASE, out=h[r])
                g += ids[k : k + n_words]
                k += 1
            if k == 1:
                h[r] = g
    return h


def _top_exact(spaced: str, n: int) -> tuple[int, int]:
    """(count, first position) of the first most frequent n-gram, by Counter (datatrove
    `find_top_duplicate`); the fallback when word hashes collide."""
    words = spaced.split(" ")
    grams = list(zip(*(words[k:] for k in range(n))))
    gram, top = Counter(grams).most_common(1)[0]
    return top, grams.index(gram)


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
        paragraphs = _paragraphs(text)
        dup, chars = _duplicates(paragraphs)
        if c.dup_para_frac and dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if c.dup_para_char_frac and chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        # Table A1: duplicate line fraction 0.30, duplicate line character fraction 0.20.
        lines = _lines(text)
        dup, chars = _duplicates(lines)
        if c.dup_line_frac and dup / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if c.dup_line_char_frac and chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"

        # The words (datatrove split_into_words) as one string joined by spaces: cached per chunk, and
        # all the n-gram rules need of them (an n-gram joined by spaces is a slice of it).
        spaced = doc.spaced
        n_words = spaced.count(" ") + 1 if spaced else 0
        top = [(n, f) for n, f in self.top if n <= n_words]
        dups = [(n, f) for n, f in self.dup if n <= n_words]
        if not top and not dups:
            return None
        # Every n-gram hash of both rule sets, one row per n, sorted in one call: fewer, larger numpy
        # calls (a call costs about as much as sorting a hundred hashes).
        t = len(top)
        csum, q, pw = _char_prefix(spaced, n_words)
        ns = [n for n, _ in dups]
        h = _gram_hashes(csum, q, pw, [n for n, _ in top], ns)
        pos, start = _runs(h, np.arange(n_words, dtype=np.uint64), max(n_words.bit_length(), _POS_BITS))
        if top:
            reason = self._top_grams(spaced, csum, len(text), top, pos[:t], start[:t])
            if reason:
                return reason
        if dups:
            ns = np.array(ns, np.uint64)[:, None]
            return self._dup_grams(spaced, csum, len(text), dups, ns, pos[t:], start[t:])
        return None

    @staticmethod
    def _top_grams(spaced, csum, n_chars, top, pos, start) -> str | None:
        # Table A1: top 2/3/4-gram character fraction 0.20/0.18/0.16. The n-gram string is the words
        # joined by spaces; datatrove takes the first most frequent one (Counter.most_common(1)): among
        # the n-grams with the highest count, the one seen first, i.e. the run of that size whose first
        # position is smallest (a run lists its positions in order). Word ids hash the word's characters;
        # the winning run's n-grams are compared as words, and a collision falls back to counting the
        # n-grams themselves.
        n_words = len(csum) - 1
        size = _run_sizes(start)
        best = size.max(1)
        first = np.where(start & (size == best[:, None]), pos, n_words).argmin(1).tolist()
        # Word k starts at (characters before it) + k in `spaced`; n-gram i is spaced[at[i]:at[i+n]-1].
        at = (csum + np.arange(n_words + 1)).tolist()
        for r, (n, frac) in enumerate(top):
            count, i = int(best[r]), 0  # every n-gram occurs once: Counter's first key, position 0
            if count > 1:
                j = first[r]
                i = int(pos[r, j])
                gram = spaced[at[i] : at[i + n] - 1]
                if any(spaced[at[p] : at[p + n] - 1] != gram for p in pos[r, j + 1 : j + count].tolist()):
                    count, i = _top_exact(spaced, n)
            chars = int(csum[i + n] - csum[i]) + (n - 1)
            if chars * count / n_chars > frac:
                return f"top_{n}_gram"
        return None

    @staticmethod
    def _dup_grams(spaced, csum, n_chars, dups, ns, pos, start) -> str | None:
        # Table A1: duplicate 5..10-gram character fraction 0.15..0.10: characters of n-grams (words
        # joined without spaces) seen before, scanning left to right and skipping a matched n-gram
        # (datatrove `find_all_duplicate`). Only positions whose n-gram occurs twice can match, so the
        # scan visits just those, in order: an n-gram matches when an earlier equal one was visited (the
        # first visited one entered the seen set), and a match skips the next n - 1 positions.
        n_words = len(csum) - 1
        valid = pos <= n_words - ns  # later positions hashed fewer than n words: never scanned
        # A match has an earlier equal n-gram, so it does not start its run: the characters of the other
        # members of the runs bound the count from above, and most rows need no scan. Where that bound
        # passes the threshold, a tighter one: matched n-grams do not overlap, so the characters of the
        # words they cover (+1 where such an n-gram starts, -1 after it, summed along the row).
        later = np.flatnonzero(valid & ~start)
        if not len(later):
            return None
        row = later // n_words
        p, n = pos.reshape(-1)[later].astype(np.int64), ns.reshape(-1).astype(np.int64)[row]
        bound = np.bincount(row, csum[p + n] - csum[p], len(dups)).tolist()
        over = [bound[r] / n_chars > frac for r, (_, frac) in enumerate(dups)]
        if not any(over):
            return None
        width = n_words + 1
        edges = np.zeros(len(dups) * width, np.int32)
        edges[row * width + p] += 1
        edges[row * width + p + n] -= 1
        covered = edges.reshape(len(dups), width)[:, :-1].cumsum(1) > 0
        bound = (covered @ (csum[1:] - csum[:-1])).tolist()
        cl = csum.tolist()
        joined = spaced.replace(" ", "")  # the words concatenated: n-gram p is joined[cl[p]:cl[p + n]]
        for r, (n, frac) in enumerate(dups):
            if not over[r] or bound[r] / n_chars <= frac:
                continue
            limit = frac * n_chars
            seen: set[str] = set()
            repeated, frontier = 0, 0
            repeats = ~start[r]  # in a run of two or more: not a start, or followed by a non-start
            repeats[:-1] |= repeats[1:]
            for p in np.sort(pos[r, valid[r] & repeats]).tolist():
                if p < frontier:
                    continue
                gram = joined[cl[p] : cl[p + n]]
                if gram in seen:
                    repeated += cl[p + n] - cl[p]
                    if repeated > limit and repeated / n_chars > frac:
                        return f"duplicated_{n}_n_grams"  # the count only grows: decided
                    frontier = p + n
                else:
                    seen.add(gram)
        return None
