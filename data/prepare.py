"""The data path of a run: read → normalize → length filter → exact dedup → tokenizer → pack (.bin/.idx).

Everything lands in `<cache_dir>/<hash of the data config>/`, built in a temporary directory and renamed
into place when complete, with a `manifest.json` (inputs, counts kept/dropped per reason, bytes, tokens,
time). A second run with the same data config finds the manifest and skips all of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np

from data.dedup import ExactDedup
from data.normalize import normalize
from data.sources import Document, ReadStats, read_source
from data.tokenizer import load_tokenizer, train_tokenizer
from train.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class PreparedData:
    root: str
    tokenizer_path: str
    prefixes: dict[str, str]
    """Megatron indexed-dataset path prefix (without .bin/.idx) per source."""
    manifest: dict


def config_hash(data_cfg) -> str:
    """Hash of everything that changes the prepared data (not where it is stored)."""
    content = dataclasses.asdict(data_cfg)
    content.pop("cache_dir")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def prepared_dir(data_cfg) -> str:
    return os.path.join(data_cfg.cache_dir, config_hash(data_cfg))


def load_prepared(root: str) -> PreparedData:
    with open(os.path.join(root, MANIFEST)) as f:
        manifest = json.load(f)
    return PreparedData(
        root=root,
        tokenizer_path=os.path.join(root, manifest["tokenizer"]["model"]),
        prefixes={name: os.path.join(root, s["prefix"]) for name, s in manifest["sources"].items()},
        manifest=manifest,
    )


def held_out_documents(num_docs: int, valid_percent: int) -> int:
    """Documents megatron-core's split puts in the validation split: it ends the training split at
    round(train fraction * documents) (BlendedMegatronDatasetBuilder._build_megatron_dataset_splits)."""
    return num_docs - int(round((100 - valid_percent) / 100 * float(num_docs)))


def _check_split(name: str, num_docs: int, valid_percent: int) -> None:
    """An empty split would make megatron-core's GPTDataset loop forever counting epochs: refuse it here."""
    held_out = held_out_documents(num_docs, valid_percent)
    if 0 < held_out < num_docs:
        return
    need = next((p for p in range(1, 50) if 0 < held_out_documents(num_docs, p) < num_docs), None)
    fix = f"use data.valid_percent={need} or more" if need else "give it at least 2 documents"
    raise ConfigError(
        "data.valid_percent",
        valid_percent,
        f"source {name!r} has {num_docs} documents after filtering, so the validation split holds out "
        f"{held_out} of them; {fix}, or raise the source's max_docs/max_bytes",
    )


def _collect(name: str, src, *, min_chars: int, dedup: ExactDedup) -> tuple[list[Document], dict]:
    stats = ReadStats()
    kept: list[Document] = []
    dropped = {"too_short": 0, "duplicate": 0}
    kept_bytes = 0
    for doc in read_source(name, kind=src.kind, paths=list(src.paths), stats=stats):
        stats.documents += 1
        doc.text = normalize(doc.text)
        if len(doc.text) < min_chars:
            dropped["too_short"] += 1
            continue
        if not dedup.is_new(doc.text):
            dropped["duplicate"] += 1
            continue
        kept.append(doc)
        kept_bytes += len(doc.text.encode("utf-8"))
        if (src.max_docs is not None and len(kept) >= src.max_docs) or (
            src.max_bytes is not None and kept_bytes >= src.max_bytes
        ):
            break
    counts = {
        "kind": src.kind,
        "files": stats.files,
        "documents_read": stats.documents,
        "documents_kept": len(kept),
        "dropped": dropped,
        "skipped_inputs": stats.skipped,
        "bytes": kept_bytes,
    }
    return kept, counts


def prepare_data(data_cfg) -> PreparedData:
    """Build (or find) the prepared data of `data_cfg`. Safe to call from several processes: the
    first to finish renames its directory into place, the others keep it."""
    root = prepared_dir(data_cfg)
    if os.path.exists(os.path.join(root, MANIFEST)):
        log.info("data: cached at %s (config hash %s)", root, os.path.basename(root))
        return load_prepared(root)

    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "docs"))
    try:
        _build(data_cfg, tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-built cache must never be found later
        raise
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: prepared at %s", root)
    return load_prepared(root)


def _build(data_cfg, tmp: str, root: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.time()
    dedup = ExactDedup()
    docs: dict[str, list[Document]] = {}
    sources: dict[str, dict] = {}
    for name, src in data_cfg.sources.items():
        docs[name], sources[name] = _collect(name, src, min_chars=data_cfg.min_chars, dedup=dedup)
        if not docs[name]:
            raise ConfigError(
                f"data.sources.{name}",
                src.kind,
                f"kept no documents (counts: {sources[name]}); check its paths and data.min_chars",
            )
        _check_split(name, len(docs[name]), data_cfg.valid_percent)
        # Shuffled (seeded) so the validation split is a random sample, not the last files read.
        random.Random(data_cfg.seed).shuffle(docs[name])
        with open(os.path.join(tmp, "docs", f"{name}.jsonl"), "w") as f:
            for d in docs[name]:
                f.write(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n")
        log.info(
            "data: %s kept %d of %d documents (%.1f MB)",
            name,
            len(docs[name]),
            sources[name]["documents_read"],
            sources[name]["bytes"] / 1e6,
        )

    tok_cfg = data_cfg.tokenizer
    per_source = tok_cfg.train_bytes // len(docs)

    def sample():
        for source_docs in docs.values():
            budget = per_source
            for d in source_docs:
                if budget <= 0:
                    break
                budget -= len(d.text)
                yield d.text

    model_path = train_tokenizer(
        sample(),
        model_prefix=os.path.join(tmp, "tokenizer"),
        vocab_size=tok_cfg.vocab_size,
        model_type=tok_cfg.model_type,
        byte_fallback=tok_cfg.byte_fallback,
    )
    tokenizer = load_tokenizer(model_path)
    for name, source_docs in docs.items():
        prefix = os.path.join(tmp, name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        n_tokens = 0
        for d in source_docs:
            ids = tokenizer.tokenize(d.text) + [tokenizer.eod]
            builder.add_document(np.asarray(ids, dtype=np.uint16), [len(ids)])
            n_tokens += len(ids)
        builder.finalize(prefix + ".idx")
        sources[name].update(prefix=name, tokens=n_tokens)
        log.info(
            "data: %s packed %d tokens (%.2f bytes/token)", name, n_tokens, sources[name]["bytes"] / n_tokens
        )

    manifest = {
        "config_hash": os.path.basename(root),
        "config": json.loads(json.dumps(dataclasses.asdict(data_cfg), default=str)),
        "sources": sources,
        "tokenizer": {"model": "tokenizer.model", "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod},
        "seconds": round(time.time() - start, 2),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    log.info("data: built in %.1f s", manifest["seconds"])
