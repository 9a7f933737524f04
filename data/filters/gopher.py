"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", arXiv:2112.11446, appendix A.1.1 and Table A1), as datatrove 0.10.x
implements them (`GopherQualityFilter`, `GopherRepetitionFilter`): same order of checks, same reasons.

Each filter returns None to keep a document or the name of the rule that drops it.
"""

from __future__ import annotations

from data.config import GopherQualityConfig, GopherRepetitionConfig
from data.filters._chunks import line_marks
from data.filters._repetition import duplicate_pieces, first_rule
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
        # (Counted in C over text.splitlines(), each line lstripped and rstripped: _chunks.line_marks.)
        lines, bullets, ends = line_marks(text)
        if c.max_bullet_lines_ratio and bullets / lines > c.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if c.max_ellipsis_lines_ratio and ends / lines > c.max_ellipsis_lines_ratio:
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
    (datatrove `find_duplicates`): everything but one copy of each distinct element, counted in C.
    FineWeb's duplicate-line rule uses it; GopherRepetition counts in _repetition.c."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


class GopherRepetition:
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig) -> None:
        self.cfg = cfg
        self.top = tuple(sorted((int(n), float(f)) for n, f in cfg.top_n_grams.items()))
        self.dup = tuple(sorted((int(n), float(f)) for n, f in cfg.dup_n_grams.items()))

    def __call__(self, doc: DocText) -> str | None:
        c = self.cfg
        text = doc.text
        if not text:
            return "empty"
        # Table A1: duplicate paragraph fraction 0.30, duplicate paragraph character fraction 0.20.
        # Paragraphs and lines are datatrove's re.split(r"\n{2,}", text.strip()) and re.split("\n+",
        # text), counted in C (_repetition.c) without building the pieces as Python strings.
        pieces, dup, chars = duplicate_pieces(text, True)
        if c.dup_para_frac and dup / pieces > c.dup_para_frac:
            return "dup_para_frac"
        if c.dup_para_char_frac and chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        # Table A1: duplicate line fraction 0.30, duplicate line character fraction 0.20.
        pieces, dup, chars = duplicate_pieces(text, False)
        if c.dup_line_frac and dup / pieces > c.dup_line_frac:
            return "dup_line_frac"
        if c.dup_line_char_frac and chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"

        # Table A1: top 2/3/4-gram character fraction 0.20/0.18/0.16, then duplicate 5..10-gram character
        # fraction 0.15..0.10, on the words (datatrove split_into_words) joined by spaces: cached per
        # chunk, and all the n-gram rules need of them (_repetition.c hashes each character once).
        return first_rule(doc.spaced, len(text), self.top, self.dup)
