"""The data path of a run: read -> HTML -> normalize -> filters -> language id -> PII -> exact and MinHash
dedup -> tokenizer -> pack (.bin/.idx) -> mix plan and report.

Per-document work runs per shard (data/shard.py) under `<cache_dir>/work/<hash>/shards/`, each shard
written atomically with its manifest and skipped when a re-run finds it. The rest (dedup across shards,
caps, tokenizer, packing) lands in `<cache_dir>/<hash of the data config>/`, built in a temporary
directory and renamed into place when complete, with a `manifest.json` (inputs, counts kept/dropped per
rule, dedup clusters, languages, bytes, tokens, seconds) and `report.md`/`report.png`. A second run with
the same data config finds the manifest and skips all of it.

With `data.num_shards=N`, a process works on shard `data.shard_index` of every source; the process that
finds all N shards finished goes on to the rest (Slurm array tasks need no extra job).
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
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.config import DataConfig
from data.dedup import content_key, lsh_clusters
from data.pack import pack
from data.shard import is_done, process_shards, shard_dir
from data.tokenizer import load_tokenizer, train_tokenizer
from train.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NOT_HASHED = ("cache_dir", "workers", "shard_index", "num_shards")


@dataclass
class PreparedData:
    root: str
    tokenizer_path: str
    prefixes: dict[str, str]
    """Megatron indexed-dataset path prefix (without .bin/.idx) per source."""
    manifest: dict


def config_hash(data_cfg) -> str:
    """Hash of everything that changes the prepared data (not where it is stored or how it is split)."""
    content = dataclasses.asdict(data_cfg)
    for key in NOT_HASHED:
        content.pop(key, None)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_dir(data_cfg) -> str:
    return os.path.join(data_cfg.cache_dir, config_hash(data_cfg))


def work_dir(data_cfg) -> str:
    return os.path.join(data_cfg.cache_dir, "work", config_hash(data_cfg))


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


def prepare_data(data_cfg: DataConfig, *, stages: dict[str, dict] | None = None) -> PreparedData | None:
    """Build (or find) the prepared data of `data_cfg`. Returns None when this process finished its
    shard but others are still running (data.num_shards > 1). Safe to call from several processes: the
    first to finish renames its directory into place, the others keep it. `stages` ({stage: {tokens,
    mix}}) adds a mix plan, checked against each source's max_repetition."""
    root = prepared_dir(data_cfg)
    if os.path.exists(os.path.join(root, MANIFEST)):
        log.info("data: cached at %s (config hash %s)", root, os.path.basename(root))
        return load_prepared(root)
    work = work_dir(data_cfg)
    if data_cfg.num_shards > 1:
        n = data_cfg.num_shards
        jobs = [(name, data_cfg.shard_index, n) for name in data_cfg.sources]
    else:
        n = data_cfg.workers
        jobs = [(name, i, n) for name in data_cfg.sources for i in range(n)]
    process_shards(data_cfg, work, jobs)
    missing = [
        (name, i) for name in data_cfg.sources for i in range(n) if not is_done(shard_dir(work, name, i, n))
    ]
    if missing:
        log.info("data: shard %d of %d done; %d shards still to run", data_cfg.shard_index, n, len(missing))
        return None

    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "docs"))
    try:
        _build(data_cfg, work, n, tmp, root, stages)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-built cache must never be found later
        raise
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: prepared at %s", root)
    return load_prepared(root)


def _load_source(work: str, name: str, n: int) -> tuple[list[dict], np.ndarray | None, dict]:
    """A source's kept documents from all its shards in read order, their MinHash signatures, and the
    shards' counts summed."""
    docs: list[dict] = []
    sigs: list[np.ndarray] = []
    counts: dict = {"files": 0, "documents_read": 0, "dropped": Counter(), "skipped_inputs": Counter()}
    counts["languages"], counts["pii"], counts["shard_seconds"] = Counter(), Counter(), 0.0
    for i in range(n):
        d = shard_dir(work, name, i, n)
        with open(os.path.join(d, "manifest.json")) as f:
            m = json.load(f)
        for key in ("files", "documents_read"):
            counts[key] += m[key]
        for key in ("dropped", "skipped_inputs", "languages", "pii"):
            counts[key].update(m[key])
        counts["shard_seconds"] += m["seconds"]
        with open(os.path.join(d, "docs.jsonl"), encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f)
        if os.path.exists(os.path.join(d, "minhash.npy")):
            sigs.append(np.load(os.path.join(d, "minhash.npy")))
    order = sorted(range(len(docs)), key=lambda j: docs[j]["order"])
    docs = [docs[j] for j in order]
    sig = np.concatenate(sigs)[order] if sigs else None
    return docs, sig, counts


def _build(data_cfg: DataConfig, work: str, n: int, tmp: str, root: str, stages: dict | None) -> None:
    from data.mix import mix_plan, write_plan
    from data.report import write_report

    start = time.time()
    seen: set[bytes] = set()
    docs: dict[str, list[dict]] = {}
    sources: dict[str, dict] = {}
    dedup_stats: dict[str, dict] = {}
    for name, src in data_cfg.sources.items():
        loaded, sig, counts = _load_source(work, name, n)
        dropped = counts["dropped"]
        keep = np.ones(len(loaded), dtype=bool)
        if data_cfg.dedup.exact:  # across shards and sources: the first in config/read order survives
            for j, d in enumerate(loaded):
                key = content_key(d["text"])
                if key in seen:
                    keep[j] = False
                    dropped["duplicate"] += 1
                else:
                    seen.add(key)
        if data_cfg.dedup.minhash and sig is not None and keep.any():
            alive = np.nonzero(keep)[0]
            clusters = lsh_clusters(sig[alive], bands=data_cfg.dedup.bands, rows=data_cfg.dedup.rows)
            keep[alive[~clusters.keep]] = False
            dropped["near_duplicate"] += int((~clusters.keep).sum())
            dedup_stats[name] = clusters.stats()
        kept: list[dict] = []
        kept_bytes = 0
        for j in np.nonzero(keep)[0].tolist():
            if (src.max_docs is not None and len(kept) >= src.max_docs) or (
                src.max_bytes is not None and kept_bytes >= src.max_bytes
            ):
                break
            kept.append(loaded[j])
            kept_bytes += len(loaded[j]["text"].encode("utf-8"))
        docs[name] = kept
        sources[name] = {
            "kind": src.kind,
            "files": counts["files"],
            "documents_read": counts["documents_read"],
            "documents_kept": len(kept),
            "dropped": dict(sorted(dropped.items())),
            "skipped_inputs": dict(sorted(counts["skipped_inputs"].items())),
            "languages": dict(counts["languages"].most_common()),
            "pii": dict(counts["pii"]),
            "bytes": kept_bytes,
            "shard_seconds": round(counts["shard_seconds"], 3),
        }
        if not kept:
            raise ConfigError(
                f"data.sources.{name}",
                src.kind,
                f"kept no documents (counts: {sources[name]}); check its paths and data.min_chars",
            )
        _check_split(name, len(kept), data_cfg.valid_percent)
        # Shuffled (seeded) so the validation split is a random sample, not the last files read.
        random.Random(data_cfg.seed).shuffle(kept)
        with open(os.path.join(tmp, "docs", f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for d in kept:
                d.pop("order", None)
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        log.info(
            "data: %s kept %d of %d documents (%.1f MB), dropped %s",
            name,
            len(kept),
            sources[name]["documents_read"],
            kept_bytes / 1e6,
            sources[name]["dropped"],
        )

    tok_cfg = data_cfg.tokenizer
    if tok_cfg.model_path:
        model_path = os.path.join(tmp, "tokenizer.model")
        shutil.copyfile(tok_cfg.model_path, model_path)
    else:
        per_source = tok_cfg.train_bytes // len(docs)

        def sample():
            for source_docs in docs.values():
                budget = per_source
                for d in source_docs:
                    if budget <= 0:
                        break
                    budget -= len(d["text"])
                    yield d["text"]

        model_path = train_tokenizer(
            sample(),
            model_prefix=os.path.join(tmp, "tokenizer"),
            vocab_size=tok_cfg.vocab_size,
            model_type=tok_cfg.model_type,
            byte_fallback=tok_cfg.byte_fallback,
            special_tokens=list(tok_cfg.special_tokens),
        )
    tokenizer = load_tokenizer(model_path)
    for name, source_docs in docs.items():
        texts = [d["text"] for d in source_docs]
        packed = pack(
            texts,
            os.path.join(tmp, name),
            model_path=model_path,
            vocab_size=tokenizer.vocab_size,
            eod=tokenizer.eod,
            workers=data_cfg.workers,
        )
        words = sum(len(t.split()) for t in texts)
        sources[name].update(
            prefix=name,
            tokens=packed["tokens"],
            token_dtype=packed["dtype"],
            pack_seconds=packed["seconds"],
            fertility=round((packed["tokens"] - len(texts)) / max(words, 1), 4),
        )
        log.info(
            "data: %s packed %d tokens (%.2f bytes/token, %.2f tokens/word)",
            name,
            packed["tokens"],
            sources[name]["bytes"] / packed["tokens"],
            sources[name]["fertility"],
        )
    plan = None
    if stages:
        plan = mix_plan(
            stages,
            available={k: v["tokens"] for k, v in sources.items()},
            max_repetition={k: s.max_repetition for k, s in data_cfg.sources.items()},
        )
        write_plan(plan, tmp)

    manifest = {
        "config_hash": os.path.basename(root),
        "config": json.loads(json.dumps(dataclasses.asdict(data_cfg), default=str)),
        "shards": n,
        "sources": sources,
        "dedup": dedup_stats,
        "tokenizer": {
            "model": "tokenizer.model",
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "special_tokens": list(tok_cfg.special_tokens),
        },
        "mix_plan": plan,
        "seconds": round(time.time() - start, 2),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    write_report(manifest, tmp)
    log.info("data: built in %.1f s", manifest["seconds"])
