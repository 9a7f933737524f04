"""Readers: each source yields `Document`s in a deterministic order (sorted paths).

Kinds (train/config.py SourceConfig):
- python_stdlib: the running interpreter's standard library `.py` files (a real code corpus on any machine).
- package_docs: prose shipped inside installed packages: `*.dist-info/METADATA` long descriptions and
  README / `*.md` / `*.rst` files.
- files: globs of `.jsonl` (one JSON object per line with `text`, optional `id`, `url`, `meta`) or plain text.

Unreadable or malformed inputs are counted and skipped (`ReadStats`), never fatal.
"""

from __future__ import annotations

import email.parser
import glob
import json
import logging
import os
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DOC_SUFFIXES = (".md", ".rst", ".markdown")


@dataclass
class Document:
    id: str
    source: str
    text: str
    url: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Count of skipped inputs by reason (bad utf-8, bad json, no text, ...)."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped %s: %s", where, reason)


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    return sorted(
        p
        for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in p.split(os.sep)
    )


def site_dirs() -> list[str]:
    """Every site-packages directory of this interpreter (the venv's and the base install's)."""
    dirs = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    dirs.add(base)
    return sorted(d for d in dirs if os.path.isdir(d))


def package_doc_files() -> list[str]:
    files: set[str] = set()
    for root in site_dirs():
        files.update(glob.glob(os.path.join(root, "*.dist-info", "METADATA")))
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
            name = os.path.basename(path)
            if (name.lower().endswith(DOC_SUFFIXES) or name.upper().startswith("README")) and os.path.isfile(
                path
            ):
                files.add(path)
    return sorted(files)


def metadata_description(raw: str) -> str:
    """The long description of a core-metadata file (the body, or the legacy Description header)."""
    msg = email.parser.Parser().parsestr(raw)
    body = msg.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    return msg.get("Description", "") or ""


def _read_text(path: str, stats: ReadStats) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not utf-8", path)
    except OSError as e:
        stats.skip(f"unreadable ({e.__class__.__name__})", path)
    return None


def _read_jsonl(path: str, source: str, stats: ReadStats) -> Iterator[Document]:
    text = _read_text(path, stats)
    if text is None:
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            stats.skip("bad json", where)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            stats.skip("no text field", where)
            continue
        yield Document(
            id=str(obj.get("id", where)),
            source=source,
            text=obj["text"],
            url=obj.get("url"),
            meta=obj.get("meta") or {},
        )


def read_source(name: str, *, kind: str, paths: list[str], stats: ReadStats) -> Iterator[Document]:
    """All documents of one source, in deterministic order."""
    if kind == "python_stdlib":
        files = stdlib_files()
    elif kind == "package_docs":
        files = package_doc_files()
    else:
        files = sorted(
            {
                p
                for pat in paths
                for p in glob.glob(os.path.expanduser(pat), recursive=True)
                if os.path.isfile(p)
            }
        )
    for path in files:
        stats.files += 1
        if kind == "files" and path.endswith(".jsonl"):
            yield from _read_jsonl(path, name, stats)
            continue
        text = _read_text(path, stats)
        if text is None:
            continue
        if kind == "package_docs" and os.path.basename(path) == "METADATA":
            text = metadata_description(text)
        yield Document(id=path, source=name, text=text, url=f"file://{path}")
