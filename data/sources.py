"""Readers: each source yields `Document`s in a deterministic order (sorted paths).

Kinds (data/config.py SourceConfig):
- python_stdlib: the running interpreter's standard library `.py` files (a real code corpus on any machine).
- package_docs: prose shipped inside installed packages: `*.dist-info/METADATA` long descriptions and
  README / `*.md` / `*.rst` files.
- files: globs of JSONL (`.jsonl`, `.json`, optionally `.gz`/`.zst` compressed; one JSON object per line
  with `text`, optional `id`, `url`, `meta`), parquet (`.parquet`, same columns), or plain text (a file is a
  document).
- hf: local JSONL/parquet files through HF `datasets.load_dataset("json"|"parquet", data_files=...)`.

Malformed inputs (bad JSON, invalid UTF-8, missing text, empty or huge documents, unreadable files) are
counted per reason in `ReadStats` and skipped, never fatal. Inputs can be split into shards round-robin
over the sorted file list (`shard_files`), so Slurm array tasks share a source without coordination.
"""

from __future__ import annotations

import email.parser
import glob
import gzip
import io
import json
import logging
import os
import site
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DOC_SUFFIXES = (".md", ".rst", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst")


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
    _warned: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self._warned < 20:  # a corrupt file can hold millions of bad lines: log the first few
            log.warning("skipped %s: %s", where, reason)
            self._warned += 1


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    return sorted(
        p
        for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in p.split(os.sep)
    )


def site_dirs() -> list[str]:
    """The site-packages directories of this interpreter: in a venv, the venv's own only, so the package
    docs corpus is what `make` installs on every machine, not whatever the host's base Python carries."""
    dirs = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
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


def file_format(path: str, fmt: str = "auto") -> str:
    """jsonl, parquet or text: `fmt` unless auto, else by the file name (compression suffix ignored)."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_text(path: str, stats: ReadStats) -> str | None:
    try:
        with _open_binary(path) as f:
            raw = f.read()
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not utf-8", path)
    except (OSError, EOFError) as e:
        stats.skip(f"unreadable ({e.__class__.__name__})", path)
    return None


def _record(obj, *, where: str, source: str, text_field: str, stats: ReadStats) -> Document | None:
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        stats.skip("no text field", where)
        return None
    try:  # JSON escapes can spell a lone surrogate ("\\ud800"): not text, and no tokenizer takes it
        obj[text_field].encode("utf-8")
    except UnicodeEncodeError:
        stats.skip("lone surrogate in text", where)
        return None
    meta = obj.get("meta") or obj.get("metadata") or {}
    return Document(
        id=str(obj["id"]) if obj.get("id") is not None else where,
        source=source,
        text=obj[text_field],
        url=obj.get("url"),
        meta=meta if isinstance(meta, dict) else {"meta": meta},
    )


def _read_jsonl(path: str, source: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    try:
        f = _open_binary(path)
    except OSError as e:
        stats.skip(f"unreadable ({e.__class__.__name__})", path)
        return
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # truncated gzip/zstd stream: keep what was read
                stats.skip(f"unreadable ({e.__class__.__name__})", f"{path}:{lineno + 1}")
                return
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("not utf-8", where)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.skip("bad json", where)
                continue
            doc = _record(obj, where=where, source=source, text_field=text_field, stats=stats)
            if doc is not None:
                yield doc


def _read_parquet(path: str, source: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet or cut files
        stats.skip(f"unreadable ({e.__class__.__name__})", path)
        return
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        stats.skip("no text field", path)
        return
    columns = [c for c in (text_field, "id", "url", "meta", "metadata") if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for obj in batch.to_pylist():
                where = f"{path}:{row}"
                row += 1
                doc = _record(obj, where=where, source=source, text_field=text_field, stats=stats)
                if doc is not None:
                    yield doc
    except Exception as e:  # a corrupt row group: keep the rows read so far
        stats.skip(f"unreadable ({e.__class__.__name__})", f"{path}:{row}")


def _read_hf(path: str, source: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    """One local file through `datasets.load_dataset` (json or parquet builder, streaming: no cache copy)."""
    import datasets

    builder = "parquet" if file_format(path) == "parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
        for i, obj in enumerate(ds):
            doc = _record(obj, where=f"{path}:{i}", source=source, text_field=text_field, stats=stats)
            if doc is not None:
                yield doc
    except Exception as e:  # datasets wraps JSON and Arrow errors in its own types
        stats.skip(f"unreadable by datasets ({e.__class__.__name__})", path)


def source_files(kind: str, paths: list[str]) -> list[str]:
    """The input files of a source, sorted (the order every later step depends on)."""
    if kind == "python_stdlib":
        return stdlib_files()
    if kind == "package_docs":
        return package_doc_files()
    return sorted(
        {p for pat in paths for p in glob.glob(os.path.expanduser(pat), recursive=True) if os.path.isfile(p)}
    )


def shard_files(files: list[str], *, shard_index: int, num_shards: int) -> list[str]:
    """Round-robin share of the sorted files (sizes even out better than contiguous blocks)."""
    return files[shard_index::num_shards]


def read_files(
    name: str,
    files: list[str],
    *,
    kind: str,
    stats: ReadStats,
    fmt: str = "auto",
    text_field: str = "text",
) -> Iterator[Document]:
    for path in files:
        stats.files += 1
        if kind == "hf":
            yield from _read_hf(path, name, text_field, stats)
            continue
        ff = file_format(path, fmt) if kind == "files" else "text"
        if ff == "jsonl":
            yield from _read_jsonl(path, name, text_field, stats)
            continue
        if ff == "parquet":
            yield from _read_parquet(path, name, text_field, stats)
            continue
        text = _read_text(path, stats)
        if text is None:
            continue
        if kind == "package_docs" and os.path.basename(path) == "METADATA":
            text = metadata_description(text)
        yield Document(id=path, source=name, text=text, url=f"file://{path}")


def read_source(
    name: str,
    *,
    kind: str,
    paths: list[str],
    stats: ReadStats,
    fmt: str = "auto",
    text_field: str = "text",
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[Document]:
    """All documents of one source (or of one shard of it), in deterministic order."""
    files = shard_files(source_files(kind, paths), shard_index=shard_index, num_shards=num_shards)
    yield from read_files(name, files, kind=kind, stats=stats, fmt=fmt, text_field=text_field)
