"""Exact deduplication: a document is a duplicate when its normalized content hash was seen before.

The first document in the deterministic read order survives, so the choice never depends on timing.
"""

from __future__ import annotations

import hashlib
import re

_WS = re.compile(r"\s+")


def content_key(text: str) -> bytes:
    """Hash of the text with all whitespace runs collapsed and case folded (so re-indented or
    re-wrapped copies count as the same document)."""
    return hashlib.blake2b(_WS.sub(" ", text).strip().casefold().encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0

    def is_new(self, text: str) -> bool:
        key = content_key(text)
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(key)
        return True
