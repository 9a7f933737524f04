"""Readers: every format, malformed input counted per reason, sharding."""

from __future__ import annotations

import gzip
import json

import pytest

from data.sources import ReadStats, file_format, read_source, shard_files


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_jsonl_gz_zst_parquet_and_text(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "alpha doc", "id": "a", "url": "http://x/a", "meta": {"k": 1}}, {"text": "beta doc"}]
    (tmp_path / "1.jsonl.gz").write_bytes(gzip.compress(_jsonl(rows)))
    (tmp_path / "2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl([{"text": "gamma"}])))
    pq.write_table(pa.table({"text": ["delta", "eps"], "id": ["d", "e"]}), tmp_path / "3.parquet")
    (tmp_path / "4.txt").write_text("zeta plain")
    stats = ReadStats()
    docs = list(read_source("s", kind="files", paths=[str(tmp_path / "*")], stats=stats))
    assert [d.text for d in docs] == ["alpha doc", "beta doc", "gamma", "delta", "eps", "zeta plain"]
    assert (docs[0].id, docs[0].url, docs[0].meta) == ("a", "http://x/a", {"k": 1})
    assert docs[1].id.endswith("1.jsonl.gz:2") and docs[3].id == "d"
    assert stats.files == 4 and stats.skipped == {}
    assert [file_format(p) for p in ("a.json.zst", "b.PARQUET", "c.md")] == ["jsonl", "parquet", "text"]


def test_hf_datasets_reader(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl([{"text": "one", "id": 1}, {"text": "two", "id": 2}]))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{broken\n')
    stats = ReadStats()
    docs = list(read_source("h", kind="hf", paths=[str(tmp_path / "*.jsonl")], stats=stats))
    assert [(d.id, d.text) for d in docs][:2] == [("1", "one"), ("2", "two")]
    assert sum(stats.skipped.values()) == 1  # the broken file is counted, the run goes on
    assert next(iter(stats.skipped)).startswith("unreadable by datasets")


def test_bad_inputs_are_counted_per_reason(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "fine"}\n{"text": 3}\n[1, 2]\nnot json\n{"text": "bad \xff utf8"}\n\n{"text": "end"}\n'
        b'{"text": "half a pair \\ud800 of surrogates"}\n'
    )
    packed = gzip.compress(_jsonl([{"text": f"kept {i}"} for i in range(3000)]))
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # a download cut in half
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    stats = ReadStats()
    docs = list(read_source("s", kind="files", paths=[str(tmp_path / "*")], stats=stats))
    cut = [d.text for d in docs if d.text.startswith("kept")]
    assert 0 < len(cut) < 3000 and cut == [f"kept {i}" for i in range(len(cut))]  # the readable part
    assert [d.text for d in docs if not d.text.startswith("kept")] == ["fine", "end"]
    assert stats.skipped["no text field"] == 2 and stats.skipped["bad json"] == 1
    assert stats.skipped["not utf-8"] == 1
    assert stats.skipped["lone surrogate in text"] == 1
    assert stats.skipped["unreadable (ArrowInvalid)"] == 1
    assert stats.skipped["unreadable (EOFError)"] == 1


def test_shards_split_files_round_robin_and_cover_all(tmp_path):
    files = [f"f{i}" for i in range(7)]
    shards = [shard_files(files, shard_index=i, num_shards=3) for i in range(3)]
    assert shards == [["f0", "f3", "f6"], ["f1", "f4"], ["f2", "f5"]]
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    seen = [
        d.text
        for k in range(2)
        for d in read_source(
            "s", kind="files", paths=[str(tmp_path / "*.txt")], stats=ReadStats(), shard_index=k, num_shards=2
        )
    ]
    assert sorted(seen) == [f"doc {i}" for i in range(5)]
