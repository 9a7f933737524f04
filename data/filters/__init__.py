"""Quality filters, in FineWeb's order: Gopher repetition, Gopher quality, C4 (a line filter that rewrites
the text), FineWeb. `FilterChain(cfg)(text)` returns the (possibly rewritten) text and None, or None and
the named reason the document is dropped (`<filter>/<rule>`, e.g. `gopher_quality/gopher_short_doc`).
"""

from __future__ import annotations

try:  # the per-chunk hot loops in C (data/filters/*.c), compiled by the install
    from data.filters import _chunks, _repetition  # noqa: F401
except ImportError as e:
    raise ImportError(
        f"the C extensions in data/filters/ are not compiled ({e}): reinstall with `pip install -e .` "
        "(`make` does it), which builds them in place (a C compiler and the Python headers are needed)"
    ) from e

from data.config import FiltersConfig
from data.filters.c4 import C4Lines
from data.filters.fineweb import FineWebQuality
from data.filters.gopher import GopherQuality, GopherRepetition
from data.filters.text import DocText

__all__ = ["C4Lines", "DocText", "FilterChain", "FineWebQuality", "GopherQuality", "GopherRepetition"]


class FilterChain:
    def __init__(self, cfg: FiltersConfig) -> None:
        self.before = []  # document filters on the original text (they share its tokenization)
        if cfg.gopher_repetition.enabled:
            self.before.append(GopherRepetition(cfg.gopher_repetition))
        if cfg.gopher_quality.enabled:
            self.before.append(GopherQuality(cfg.gopher_quality))
        self.c4 = C4Lines(cfg.c4) if cfg.c4.enabled else None
        self.after = [FineWebQuality(cfg.fineweb)] if cfg.fineweb.enabled else []

    @property
    def enabled(self) -> bool:
        return bool(self.before or self.c4 or self.after)

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        doc = DocText(text)
        for f in self.before:
            reason = f(doc)
            if reason is not None:
                return None, f"{f.name}/{reason}"
        if self.c4 is not None:
            new, reason = self.c4.clean(doc.text)
            if new is None:
                return None, f"c4/{reason}"
            if new != doc.text:
                doc = DocText(new)
        for f in self.after:
            reason = f(doc)
            if reason is not None:
                return None, f"{f.name}/{reason}"
        return doc.text, None
