"""Text normalization applied to every document before dedup and tokenization."""

from __future__ import annotations

import re
import unicodedata

_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Unicode NFC; newlines to \\n; trailing whitespace stripped per line (indentation kept: code is a
    source); at most two consecutive blank lines; no leading/trailing blank lines; NUL and BOM removed."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n")
