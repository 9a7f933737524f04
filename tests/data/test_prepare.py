"""The data path on a small real sample: read, normalize, dedup, tokenizer, pack, blend, cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data.blend import micro_batches, step_indices, train_dataset, valid_datasets
from data.config import DataConfig, SourceConfig, TokenizerConfig
from data.dedup import ExactDedup
from data.normalize import normalize
from data.prepare import held_out_documents, prepare_data
from data.sources import ReadStats, metadata_description, read_source
from data.tokenizer import load_tokenizer
from train.errors import ConfigError


def half_built(cache) -> list[str]:
    """Anything in the cache but finished shards (which a re-run reuses): prepared dirs, temporaries."""
    out = [p.name for p in cache.iterdir() if p.name != "work"]
    for dirpath, dirnames, filenames in os.walk(cache / "work"):
        out += [d for d in dirnames if ".tmp-" in d]
        if "docs.jsonl" in filenames and "manifest.json" not in filenames:
            out.append(dirpath)
    return out


def test_normalize():
    assert normalize("e\u0301t\u00e9\r\nline  \t\n\n\n\n\nend\n\n") == "\u00e9t\u00e9\nline\n\n\nend"
    assert normalize("\ufeff    indented\x00") == "    indented"  # indentation kept (code), BOM/NUL dropped


def test_exact_dedup_ignores_whitespace_and_case():
    d = ExactDedup()
    assert d.is_new("def f(x):\n    return x")
    assert not d.is_new("def  f(x):\n\treturn   X")
    assert d.is_new("def g(x):\n    return x")
    assert d.duplicates == 1


def test_metadata_description():
    raw = (
        "Metadata-Version: 2.1\nName: pkg\nDescription-Content-Type: text/markdown\n\n# pkg\n\nDoes things.\n"
    )
    assert metadata_description(raw).strip() == "# pkg\n\nDoes things."


def test_malformed_inputs_are_counted_and_skipped(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"text": "good one", "id": "g1"}\nnot json\n{"no_text": 1}\n\n{"text": "two"}\n'
    )
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad utf-8 \x80")
    (tmp_path / "c.txt").write_text("plain text document")
    stats = ReadStats()
    docs = list(read_source("s", kind="files", paths=[str(tmp_path / "*")], stats=stats))
    assert [d.text for d in docs] == ["good one", "two", "plain text document"]
    assert docs[0].id == "g1" and docs[0].source == "s"
    assert stats.files == 3
    assert stats.skipped == {"bad json": 1, "no text field": 1, "not utf-8": 1}


def test_a_source_too_small_for_a_validation_split_is_refused(tmp_path):
    # megatron-core ends the training split at round(0.98 * 5) = 5: nothing held out, and GPTDataset
    # would loop forever counting epochs of an empty split. 10% holds out 5 - round(4.5) = 1.
    assert (
        held_out_documents(5, 2) == 0 and held_out_documents(5, 10) == 1 and held_out_documents(400, 2) == 8
    )
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"document number {i} " * 10}) + "\n" for i in range(5))
    )
    cfg = DataConfig(
        sources={"few": SourceConfig(kind="files", paths=[str(tmp_path / "*.jsonl")])},
        tokenizer=TokenizerConfig(vocab_size=300, train_bytes=10_000),
        cache_dir=str(tmp_path / "cache"),
        valid_percent=2,
    )
    with pytest.raises(
        ConfigError,
        match=r"data.valid_percent=2: source 'few' has 5 documents .* holds out 0 .*valid_percent=10",
    ):
        prepare_data(cfg)
    assert half_built(tmp_path / "cache") == []  # nothing half-built left behind


def test_a_source_with_no_usable_documents_is_refused_with_its_counts(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "short"}\nnot json\n')
    cfg = DataConfig(
        sources={"tiny": SourceConfig(kind="files", paths=[str(tmp_path / "*.jsonl")])},
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(
        ConfigError, match=r"data.sources.tiny='files': kept no documents .*'too_short': 1.*'bad json': 1"
    ):
        prepare_data(cfg)
    assert half_built(tmp_path / "cache") == []


def small_data(cache_dir: str, **tok) -> DataConfig:
    return DataConfig(
        sources={
            "code": SourceConfig(kind="python_stdlib", max_docs=60),
            "docs": SourceConfig(kind="package_docs", max_docs=60),
        },
        tokenizer=TokenizerConfig(vocab_size=tok.get("vocab_size", 512), train_bytes=400_000),
        cache_dir=cache_dir,
        valid_percent=10,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_data(small_data(str(tmp_path_factory.mktemp("cache"))))


def test_prepare_writes_manifest_docs_tokenizer_and_tokens(prepared):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    m = prepared.manifest
    assert m["tokenizer"]["vocab_size"] == 512
    for name in ("code", "docs"):
        s = m["sources"][name]
        assert s["documents_kept"] == 60
        assert s["documents_read"] == 60 + sum(s["dropped"].values())
        assert s["tokens"] > 0
        ds = IndexedDataset(prepared.prefixes[name])
        assert len(ds) == 60 and sum(len(ds[i]) for i in range(len(ds))) == s["tokens"]
    # Each packed document is exactly its normalized text plus one end-of-document token.
    tok = load_tokenizer(prepared.tokenizer_path)
    with open(os.path.join(prepared.root, "docs", "code.jsonl")) as f:
        first = json.loads(f.readline())
    code_ds = IndexedDataset(prepared.prefixes["code"])  # keep it alive: items are views of its mmap
    ids = code_ds[0]
    assert ids[-1] == tok.eod and tok.detokenize(ids[:-1].tolist()) == first["text"]
    assert first["text"] == normalize(first["text"])


def test_prepare_is_cached_by_config_hash(prepared, tmp_path_factory):
    cfg = small_data(os.path.dirname(prepared.root))
    manifest = os.path.join(prepared.root, "manifest.json")
    before = os.path.getmtime(manifest)
    again = prepare_data(cfg)
    assert again.root == prepared.root and os.path.getmtime(manifest) == before
    other = prepare_data(small_data(os.path.dirname(prepared.root), vocab_size=600))
    assert other.root != prepared.root  # another config, another directory


def test_blend_follows_weights_and_holds_out_validation(prepared, megatron_world1):
    ds = train_dataset(
        prepared, mix={"code": 0.7, "docs": 0.3}, seq_length=64, samples=1000, seed=3, valid_percent=10
    )
    share = np.bincount(np.asarray(ds.dataset_index[:1000]), minlength=2) / 1000  # sources sorted: code, docs
    assert abs(share[0] - 0.7) < 0.01 and abs(share[1] - 0.3) < 0.01
    valid = valid_datasets(
        prepared, sources=["code", "docs"], seq_length=64, samples=8, seed=3, valid_percent=10
    )
    assert set(valid) == {"code", "docs"} and all(len(v) >= 8 for v in valid.values())
    # Train and validation samples come from different documents.
    code_train = ds.datasets[0]
    train_docs = set(code_train.document_index.tolist())
    valid_docs = set(valid["code"].document_index.tolist())
    assert train_docs and valid_docs and not train_docs & valid_docs
    mb = micro_batches(ds, step_indices(16, batch_sequences=8, dp_rank=1, dp_size=2), micro_batch=2)
    assert len(mb) == 2 and mb[0]["tokens"].shape == (2, 64)
    assert (mb[0]["labels"][:, :-1] == mb[0]["tokens"][:, 1:]).all()
    # The global batch of 8 samples from sample 16 (step 2 at 8 a step): rank 1 holds its second half.
    assert step_indices(16, batch_sequences=8, dp_rank=1, dp_size=2) == range(20, 24)


def test_bad_documents_are_counted_and_finished_shards_survive_a_failed_run(tmp_path):
    rows = [{"text": f"document {i} " + "word " * 30} for i in range(12)]
    rows += [{"text": "x" * 5000}, {"text": ""}, {"text": "tiny"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        sources={"s": SourceConfig(kind="files", paths=[str(tmp_path / "*.jsonl")])},
        tokenizer=TokenizerConfig(vocab_size=300, train_bytes=10_000),
        cache_dir=str(tmp_path / "cache"),
        max_doc_bytes=4000,
        valid_percent=2,
    )
    with pytest.raises(ConfigError, match="valid_percent"):  # 12 documents: 2% holds out none
        prepare_data(cfg)
    shard = next((tmp_path / "cache" / "work").glob("*/shards/s/*/manifest.json"))
    counts = json.loads(shard.read_text())
    assert counts["dropped"] == {"too_large": 1, "too_short": 2} and counts["documents_kept"] == 12
    before = shard.stat().st_mtime
    cfg.valid_percent = 10  # not a per-shard setting: the finished shard is reused
    prepared = prepare_data(cfg)
    assert shard.stat().st_mtime == before and prepared.manifest["sources"]["s"]["documents_kept"] == 12
