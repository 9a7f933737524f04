"""HTML to text with trafilatura (Barbaresi 2021), the extractor FineWeb uses, with datatrove's settings
(favor_precision, no comments, trafilatura's own deduplication). Returns "" when nothing is extracted."""

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
