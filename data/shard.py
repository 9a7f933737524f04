"""One shard of one source through the per-document steps: read -> HTML extraction -> normalize -> size
checks -> quality filters -> language id -> PII -> dedup keys and MinHash signatures.

A shard writes `docs.jsonl` (kept documents with their read-order key), `minhash.npy` and `manifest.json`
(counts kept/dropped per rule, languages, bytes, seconds) into a temporary directory renamed into place
when complete: a finished shard is never half-written, and a re-run skips it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import Counter

import numpy as np

from data.config import DataConfig, SourceConfig
from data.dedup import ExactDedup, MinHasher
from data.filters import FilterChain
from data.normalize import normalize
from data.pii import PIIRedactor
from data.sources import ReadStats, read_files, shard_files, source_files

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def shard_dir(work: str, source: str, index: int, num_shards: int) -> str:
    return os.path.join(work, "shards", source, f"{index:05d}-of-{num_shards:05d}")


def is_done(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST))


def process_shard(
    name: str, src: SourceConfig, cfg: DataConfig, *, index: int, num_shards: int, out: str
) -> dict:
    """Run the per-document steps on shard `index` of source `name`; returns (and writes) its manifest."""
    if is_done(out):
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)
    start = time.time()
    files = source_files(src.kind, list(src.paths))
    mine = shard_files(list(enumerate(files)), shard_index=index, num_shards=num_shards)
    stats = ReadStats()
    if src.html:
        from data.html import reset_html_state

        reset_html_state()  # the shard's text must not depend on what this worker extracted before
    chain = FilterChain(cfg.filters) if src.filter else None
    redact = PIIRedactor(emails=cfg.pii.emails, ips=cfg.pii.ips) if (cfg.pii.emails or cfg.pii.ips) else None
    hasher = MinHasher(ngram=cfg.dedup.ngram, bands=cfg.dedup.bands, rows=cfg.dedup.rows, seed=cfg.dedup.seed)
    exact = ExactDedup() if cfg.dedup.exact else None  # within the shard; across shards in prepare.py
    dropped: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    signatures: list[np.ndarray] = []
    kept = kept_bytes = read = 0
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "docs.jsonl"), "w", encoding="utf-8") as f:
        for file_index, path in mine:
            position = 0
            for doc in read_files(
                name, [path], kind=src.kind, stats=stats, fmt=src.format, text_field=src.text_field
            ):
                position += 1
                read += 1
                text = doc.text
                if len(text) > cfg.max_doc_bytes or len(text.encode("utf-8", "replace")) > cfg.max_doc_bytes:
                    dropped["too_large"] += 1
                    continue
                if src.html:
                    from data.html import html_to_text

                    text = html_to_text(text)
                text = normalize(text)
                if len(text) < cfg.min_chars:
                    dropped["too_short"] += 1
                    continue
                if chain is not None and chain.enabled:
                    text, reason = chain(text)
                    if text is None:
                        dropped[reason] += 1
                        continue
                    if len(text) < cfg.min_chars:
                        dropped["too_short_after_filters"] += 1
                        continue
                if src.languages:
                    from data.langid import language_decision

                    lang, score, reason = language_decision(
                        text, allowed=list(src.languages), threshold=src.language_threshold
                    )
                    languages[lang] += 1
                    if reason is not None:
                        dropped[reason] += 1
                        continue
                    doc.meta = {**doc.meta, "language": lang, "language_score": round(score, 4)}
                if redact is not None:
                    text = redact(text)
                if exact is not None and not exact.is_new(text):
                    dropped["duplicate"] += 1
                    continue
                doc.text = text
                record = dataclasses.asdict(doc)
                record["order"] = [file_index, position]
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if cfg.dedup.minhash:
                    signatures.append(hasher.signature(text))
                kept += 1
                kept_bytes += len(text.encode("utf-8"))
                # A shard never needs more than the source's cap (the cap is applied again after dedup).
                if (src.max_docs is not None and kept >= src.max_docs) or (
                    src.max_bytes is not None and kept_bytes >= src.max_bytes
                ):
                    break
            else:
                continue
            break
    if cfg.dedup.minhash:
        k = cfg.dedup.bands * cfg.dedup.rows
        sig = np.stack(signatures) if signatures else np.zeros((0, k), dtype=np.uint64)
        np.save(os.path.join(tmp, "minhash.npy"), sig)
    manifest = {
        "source": name,
        "shard": [index, num_shards],
        "files": stats.files,
        "inputs": [path for _, path in mine],
        "documents_read": read,
        "documents_kept": kept,
        "bytes": kept_bytes,
        "dropped": dict(sorted(dropped.items())),
        "skipped_inputs": dict(sorted(stats.skipped.items())),
        "config": {
            "filters": dataclasses.asdict(cfg.filters) if src.filter else None,
            "dedup": dataclasses.asdict(cfg.dedup),
            "pii": dataclasses.asdict(cfg.pii),
            "source": dataclasses.asdict(src),
        },
        "languages": dict(languages.most_common()),
        "pii": redact.counts if redact is not None else {},
        "seconds": round(time.time() - start, 3),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished this shard first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _run_one(args) -> dict:
    name, src, cfg, index, num_shards, out = args
    return process_shard(name, src, cfg, index=index, num_shards=num_shards, out=out)


def process_shards(cfg: DataConfig, work: str, jobs: list[tuple[str, int, int]]) -> list[dict]:
    """Process (source, index, num_shards) jobs, with a process pool when data.workers > 1."""
    args = [(name, cfg.sources[name], cfg, i, n, shard_dir(work, name, i, n)) for name, i, n in jobs]
    if cfg.workers > 1 and len(args) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(cfg.workers, len(args))) as pool:
            return pool.map(_run_one, args, chunksize=1)
    return [_run_one(a) for a in args]
