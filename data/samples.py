"""Real text nobody here wrote, for tests and benchmarks: package documentation shipped in this
interpreter's site-packages (always there), and, where the Debian packages are installed, fortunes in
eight languages and the Debian Administrator's Handbook (HTML, 26 languages).
Each function returns [] when its material is absent; callers skip with a reason."""

from __future__ import annotations

import glob
import os

from data.sources import metadata_description, package_doc_files

FORTUNES = "/usr/share/games/fortunes"
HANDBOOK = "/usr/share/doc/debian-handbook/html"


def package_docs(limit: int) -> list[str]:
    """Up to `limit` README/.md/.rst/METADATA texts of installed packages, in sorted path order."""
    out: list[str] = []
    for path in package_doc_files():
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if os.path.basename(path) == "METADATA":
            text = metadata_description(text)
        if text.strip():
            out.append(text)
        if len(out) >= limit:
            break
    return out


def fortunes(language: str = "", *, per_doc: int = 1) -> list[str]:
    """Fortunes of one language directory ("" = English, "de", "es", ... as fortunes-<lang> installs
    them); `per_doc` consecutive fortunes joined into one document."""
    root = os.path.join(FORTUNES, language) if language else FORTUNES
    items: list[str] = []
    for path in sorted(glob.glob(os.path.join(root, "*"))):
        if not os.path.isfile(path) or path.endswith((".dat", ".u8")) or os.path.islink(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        items.extend(t.strip() for t in raw.split("\n%\n") if t.strip())
    return ["\n\n".join(items[i : i + per_doc]) for i in range(0, len(items), per_doc)]


def fortune_languages() -> dict[str, str]:
    """Installed fortune directories -> ISO 639-1 language ("" is English)."""
    out = {"": "en"} if os.path.isdir(FORTUNES) else {}
    for lang in ("de", "es", "it", "ru", "pl", "zh", "cs"):
        if os.path.isdir(os.path.join(FORTUNES, lang)):
            out[lang] = lang
    return out


def handbook_pages(language: str = "en-US") -> list[str]:
    """Raw HTML pages of the Debian Administrator's Handbook in one language."""
    out = []
    for path in sorted(glob.glob(os.path.join(HANDBOOK, language, "*.html"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return out


def mixed_corpus(limit: int) -> list[str]:
    """Up to `limit` documents mixing package docs, fortunes (10 per document, every installed
    language) and the handbook's English pages as trafilatura extracts them: prose, code, lists and
    markup-heavy text, so every filter rule is exercised."""
    from data.html import html_to_text, reset_html_state

    reset_html_state()  # the same documents on every call in a process
    parts = [package_docs(limit // 2)]
    for lang in fortune_languages():
        parts.append(fortunes(lang, per_doc=10))
    parts.append([t for t in (html_to_text(h) for h in handbook_pages()[: max(1, limit // 4)]) if t])
    out: list[str] = []
    i = 0
    while len(out) < limit and any(i < len(p) for p in parts):  # interleave the kinds
        out.extend(p[i] for p in parts if i < len(p))
        i += 1
    return out[:limit]
