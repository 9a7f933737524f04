"""The whole data path on real text: filters, language id, PII, dedup across shards, tokenizer with
special tokens, packing, mix plan, report; split into two shards as two Slurm array tasks would."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from data.config import DataConfig, DedupConfig, FiltersConfig, PIIConfig, SourceConfig, TokenizerConfig
from data.prepare import prepare_data, work_dir
from data.samples import mixed_corpus


@pytest.fixture(scope="module")
def web_dir(tmp_path_factory):
    docs = mixed_corpus(240)
    if len(docs) < 240:
        pytest.skip("fewer than 240 real documents installed")
    from data.filters import FilterChain
    from data.langid import detect

    rng = random.Random(0)
    rows = [{"text": t, "id": f"d{i}"} for i, t in enumerate(docs)]
    chain = FilterChain(filters_config())
    good = [i for i, t in enumerate(docs) if chain(t)[1] is None and detect(t)[0] == "en"]
    assert len(good) >= 20, f"only {len(good)} of the sample pass the filters"
    for i in good[:20]:  # planted near-duplicates of documents the filters keep: 1% of words replaced
        pieces = re.split(r"(\s+)", docs[i])  # words at even positions; whitespace (newlines) kept
        words = list(range(0, len(pieces), 2))
        for j in rng.sample(words, max(1, len(words) // 100)):
            pieces[j] = "zzz"
        rows.append({"text": "".join(pieces), "id": f"copy{i}"})
    rows.append({"text": "Contact: jane.roe@example.net from 8.8.4.4. " + docs[0], "id": "pii"})
    root = tmp_path_factory.mktemp("web")
    for k in range(4):  # four files: two shards of two files each
        with open(root / f"part{k}.jsonl", "w") as f:
            for r in rows[k::4]:
                f.write(json.dumps(r) + "\n")
    with open(root / "part4.jsonl", "w") as f:
        f.write("{broken json\n")
    return root


def filters_config() -> FiltersConfig:
    filters = FiltersConfig()
    filters.gopher_repetition.enabled = filters.gopher_quality.enabled = True
    filters.c4.enabled = filters.fineweb.enabled = True
    filters.c4.filter_no_terminal_punct = False  # as FineWeb runs it
    return filters


def config(web_dir, cache: str, shard: int) -> DataConfig:
    return DataConfig(
        sources={
            "web": SourceConfig(
                kind="files", paths=[str(web_dir / "*.jsonl")], languages=["en"], max_repetition=2
            ),
            "code": SourceConfig(kind="python_stdlib", max_docs=40, filter=False),
        },
        tokenizer=TokenizerConfig(vocab_size=600, train_bytes=300_000, special_tokens=["<|bos|>", "<|pad|>"]),
        filters=filters_config(),
        dedup=DedupConfig(minhash=True),
        pii=PIIConfig(emails=True, ips=True),
        cache_dir=cache,
        valid_percent=10,
        num_shards=2,
        shard_index=shard,
    )


def test_sharded_run_filters_dedups_packs_and_reports(web_dir, tmp_path):
    cache = str(tmp_path / "cache")
    stages = {"base": {"tokens": 20_000, "mix": {"web": 1, "code": 1}}}
    assert prepare_data(config(web_dir, cache, 0), stages=stages) is None  # shard 0 of 2: others to run
    shard0 = os.path.join(
        work_dir(config(web_dir, cache, 0)), "shards", "web", "00000-of-00002", "manifest.json"
    )
    before = os.path.getmtime(shard0)
    prepared = prepare_data(config(web_dir, cache, 1), stages=stages)  # the last shard finishes the job
    assert prepared is not None and os.path.getmtime(shard0) == before  # shard 0 was not redone
    m = prepared.manifest
    web = m["sources"]["web"]
    assert web["files"] == 5 and web["documents_read"] == 240 + 20 + 1
    assert web["skipped_inputs"] == {"bad json": 1}
    assert web["documents_read"] == web["documents_kept"] + sum(web["dropped"].values())
    reasons = set(web["dropped"])
    assert {r.split("/")[0] for r in reasons} >= {"gopher_quality", "c4", "language"}
    # The planted copies go; one edit in a short copy can change enough 5-grams to let it escape.
    assert web["dropped"].get("near_duplicate", 0) >= 18 and m["dedup"]["web"]["clusters"] >= 18
    assert web["languages"]["en"] > 0 and len(web["languages"]) >= 3
    with open(os.path.join(prepared.root, "docs", "web.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    assert not any("jane.roe@example.net" in t or "8.8.4.4" in t for t in texts)
    assert len(texts) == web["documents_kept"]
    # Tokenizer: special tokens are single pieces; packed tokens match the manifest.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=prepared.tokenizer_path)
    bos = sp.piece_to_id("<|bos|>")
    assert (
        bos not in (sp.unk_id(), 0)
        and bos in sp.encode("end.<|bos|>Start")
        and m["tokenizer"]["vocab_size"] == 600
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prepared.prefixes["web"])
    assert len(ds) == len(texts) and int(ds.sequence_lengths.sum()) == web["tokens"]
    assert web["token_dtype"] == "uint16" and 0 < web["fertility"] < 5
    with open(os.path.join(prepared.root, "mix_plan.json")) as f:
        plan = json.load(f)
    assert plan["base"]["sources"]["web"]["tokens"] == 10_000
    assert os.path.getsize(os.path.join(prepared.root, "report.png")) > 1000
    with open(os.path.join(prepared.root, "report.md")) as f:
        assert "| web |" in f.read()
    # Same data config with other sharding: the same prepared directory (sharding is not in the hash).
    assert prepare_data(config(web_dir, cache, 1)).root == prepared.root


def test_data_app_composes_with_filtered_group():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import data.__main__  # noqa: F401  registers the schema

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    with initialize_config_dir(config_dir=os.path.abspath(configs), version_base="1.3"):
        cfg = compose("data_app", ["data=filtered", "data.num_shards=4", "data.shard_index=3"])
    obj = OmegaConf.to_object(cfg)
    assert (
        obj.data.dedup.minhash
        and obj.data.filters.c4.enabled
        and obj.data.sources["docs"].languages == ["en"]
    )
    assert (obj.data.shard_index, obj.data.num_shards) == (3, 4)
