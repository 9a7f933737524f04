"""Exact and MinHash-LSH dedup: recall on planted near-duplicates, no false merges of distinct text,
deterministic survivors."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data.dedup import ExactDedup, MinHasher, lsh_clusters
from data.samples import package_docs


def test_exact_dedup_ignores_whitespace_and_case():
    d = ExactDedup()
    assert d.is_new("def f(x):\n    return x")
    assert not d.is_new("def  f(x):\n\treturn   X")
    assert d.is_new("def g(x):\n    return x")
    assert d.duplicates == 1


def _edit(text: str, rate: float, rng: random.Random) -> str:
    """Replace `rate` of the words with random other words."""
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
        words[i] = f"w{rng.randrange(10**6)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def originals():
    """Up to 120 package docs of 150+ words that are mutually distinct (installed packages can ship the
    same README twice, e.g. a package and its stub), so every planted copy has exactly one original."""
    docs = [d for d in package_docs(3000) if len(d.split()) >= 150][:200]
    hasher = MinHasher()
    clusters = lsh_clusters(np.stack([hasher.signature(t) for t in docs]), bands=14, rows=8)
    sizes = np.bincount(clusters.cluster)
    docs = [d for d, c in zip(docs, clusters.cluster) if sizes[c] == 1][:120]
    if len(docs) < 60:
        pytest.skip("fewer than 60 distinct package docs of 150+ words installed")
    return docs


def test_minhash_finds_planted_near_duplicates(originals):
    rng = random.Random(0)
    hasher = MinHasher()
    texts = list(originals)
    copies = {}  # index of the copy -> index of its original
    for i in range(0, len(originals), 2):
        copies[len(texts)] = i
        texts.append(_edit(originals[i], 0.01, rng))
    sig = np.stack([hasher.signature(t) for t in texts])
    assert sig.shape == (len(texts), 14 * 8)
    clusters = lsh_clusters(sig, bands=14, rows=8)
    found = sum(clusters.cluster[c] == clusters.cluster[o] for c, o in copies.items())
    assert found == len(copies)  # recall 1.0 at 1% word edits
    # Every planted copy goes, and its original (earlier in read order) survives.
    assert all(not clusters.keep[c] and clusters.keep[o] for c, o in copies.items())
    stats = clusters.stats()
    assert stats["removed"] >= len(copies) and stats["documents"] == len(texts)


def test_minhash_estimates_jaccard_similarity():
    rng = random.Random(1)
    base = " ".join(f"word{rng.randrange(5000)}" for _ in range(2000))
    hasher = MinHasher(bands=32, rows=8)  # 256 hashes: standard error sqrt(J(1-J)/256) ~ 0.03
    for seed in range(3):
        edited = _edit(base, 0.05, random.Random(seed))
        sa, sb = set(hasher.shingles(base).tolist()), set(hasher.shingles(edited).tolist())
        true = len(sa & sb) / len(sa | sb)  # 5% of words changed touches ~23% of the 5-grams
        est = float((hasher.signature(base) == hasher.signature(edited)).mean())
        assert 0.55 < true < 0.7 and abs(est - true) < 0.1, (true, est)
    unrelated = hasher.signature(" ".join(f"other{rng.randrange(5000)}" for _ in range(2000)))
    assert (hasher.signature(base) == unrelated).mean() < 0.02


def test_lsh_band_probability_matches_the_s_curve():
    # P(candidate) = 1 - (1 - s^r)^b (Leskovec et al., MMDS 3.4.2): FineWeb's 14x8 at s = 0.8 is 0.77.
    rng = np.random.default_rng(0)
    n, k = 4000, 112
    a = rng.integers(0, 2**63, size=(n, k), dtype=np.uint64)
    b = np.where(rng.random((n, k)) < 0.8, a, a + np.uint64(1))  # each hash agrees with probability 0.8
    clusters = lsh_clusters(np.concatenate([a, b]), bands=14, rows=8)  # pair i is (i, n + i)
    hits = (clusters.cluster[n:] == np.arange(n)).mean()
    assert abs(hits - (1 - (1 - 0.8**8) ** 14)) < 0.03


def test_distinct_documents_are_not_merged_and_order_decides(originals):
    hasher = MinHasher()
    sig = np.stack([hasher.signature(t) for t in originals])
    clusters = lsh_clusters(sig, bands=14, rows=8)
    # Package docs include some real near-copies (a README and its METADATA); most stay alone.
    assert clusters.keep.sum() >= 0.8 * len(originals)
    rev = lsh_clusters(sig[::-1].copy(), bands=14, rows=8)
    assert rev.stats()["clusters"] == clusters.stats()["clusters"]  # same groups either way
    empty = hasher.signature("")
    assert (empty == np.iinfo(np.uint64).max).all()
