"""FineWeb's extra quality rules (Penedo et al. 2024, "The FineWeb Datasets", section 3.3.2 and
appendix; datatrove 0.10.x `FineWebQualityFilter`): drop pages where fewer than 12% of lines end in
terminal punctuation, more than 67% of lines are 30 characters or shorter, more than 1% of characters are
in duplicated lines, or there are more than 0.3 newlines per word (list-like pages)."""

from __future__ import annotations

from data.config import FineWebConfig
from data.filters.gopher import _duplicates
from data.filters.text import TERMINAL_PUNCTUATION, DocText


class FineWebQuality:
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig) -> None:
        self.cfg = cfg
        self.stop_chars = tuple(TERMINAL_PUNCTUATION)

    def __call__(self, doc: DocText) -> str | None:
        c = self.cfg
        lines = [line for line in doc.text.split("\n") if line.strip() != ""]
        if not lines:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(self.stop_chars)) / len(lines)
        if ratio < c.line_punct_thr and not (ratio == 0 and c.line_punct_exclude_zero):
            return "line_punct_ratio"
        ratio = sum(1 for line in lines if len(line) <= c.short_line_length) / len(lines)
        if ratio > c.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / len(doc.text.replace("\n", "")) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        # Every whitespace-separated chunk holds at least one word, so newlines / chunks bounds the
        # ratio from above: the words (spaCy's tokenizer) are only needed when that bound is exceeded.
        newlines = doc.text.count("\n")
        if (
            newlines / len(doc.text.split()) > c.new_line_ratio
            and newlines / doc.counts.words > c.new_line_ratio
        ):
            return "list_ratio"
        return None
