"""HTML to text with trafilatura (Barbaresi 2021), the extractor FineWeb uses, with datatrove's settings
(favor_precision, no comments, trafilatura's own deduplication). Returns "" when nothing is extracted.

trafilatura's deduplication drops text segments it has seen often in earlier calls of the same process (a
module-level LRU cache), so what a page yields depends on what was extracted before it: `reset_html_state`
starts each shard (and each sample corpus) from an empty cache, so a shard's text depends on that shard alone,
whichever worker runs it and whatever it ran before."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def html_to_text(html: str) -> str:
    import trafilatura

    try:
        text = trafilatura.extract(
            html,
            favor_precision=True,
            include_comments=False,
            deduplicate=True,
        )
    except Exception as e:  # lxml raises on some broken markup: the page yields no text
        log.debug("trafilatura failed: %s", e)
        return ""
    return text or ""


def reset_html_state() -> None:
    """Forget the segments trafilatura's deduplication has seen (and its other caches)."""
    from trafilatura.meta import reset_caches

    reset_caches()
