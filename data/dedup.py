"""Deduplication: exact (normalized content hash) and near-duplicate (MinHash LSH).

Exact: a document is a duplicate when its text, with whitespace runs collapsed and case folded, hashes
like one read before. MinHash (Broder 1997) estimates the Jaccard similarity of two documents' sets of
word 5-grams; LSH (Leskovec et al., Mining of Massive Datasets, ch. 3.4) puts two documents in the same
bucket when all `rows` hashes of any one of `bands` bands agree, which happens with probability
1 - (1 - s^rows)^bands for similarity s. FineWeb's 14 bands x 8 rows: 0.77 at s=0.8, 0.23 at s=0.7,
0.92 at s=0.85. Documents linked by any shared bucket form a cluster; the survivor of a cluster is its
first document in the deterministic read order (sorted files, then position), so the choice never
depends on timing or on how the work was sharded.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_PRIME = np.uint64((1 << 61) - 1)  # Mersenne prime modulus of the universal hash family


def content_key(text: str) -> bytes:
    """Hash of the text with all whitespace runs collapsed and case folded (so re-indented or
    re-wrapped copies count as the same document)."""
    return hashlib.blake2b(_WS.sub(" ", text).strip().casefold().encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0

    def is_new(self, text: str) -> bool:
        key = content_key(text)
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(key)
        return True


def _words(text: str) -> list[str]:
    """Lower-cased word characters with diacritics removed (datatrove's `simplify_text` in spirit:
    punctuation and spacing changes do not change the shingles)."""
    text = unicodedata.normalize("NFD", text.lower())
    if not text.isascii():
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return _WORD.findall(text)


class MinHasher:
    """Signatures of `bands * rows` MinHash values over word `ngram`-shingles."""

    def __init__(self, *, ngram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1) -> None:
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        k = bands * rows
        # h_i(x) = (a_i * x + b_i) mod (2^61 - 1) with x, a_i, b_i < 2^32: a_i * x + b_i < 2^64, no overflow.
        self.a = rng.integers(1, 1 << 32, size=k, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=k, dtype=np.uint64)
        self._word_hash: dict[str, int] = {}

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the document's word n-grams (a short document is one shingle)."""
        cache = self._word_hash
        words = _words(text)
        if not words:
            return np.zeros(0, dtype=np.uint64)
        ids = np.fromiter(
            (cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode()) | 1) for w in words),
            dtype=np.uint64,
            count=len(words),
        )
        if len(cache) > 2_000_000:
            cache.clear()
        n = min(self.ngram, len(ids))
        m = len(ids) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):  # polynomial hash of each window, wrapping at 2^64
            h = h * np.uint64(0x100000001B3) + ids[k : k + m]
        return np.unique((h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF)))

    def signature(self, text: str) -> np.ndarray:
        """(bands * rows,) uint64 MinHash signature; all-ones for a document without words."""
        x = self.shingles(text)
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(x), 2048):  # bound the (shingles, hashes) temporary to ~1.8 MB
            block = x[start : start + 2048, None]
            np.minimum(sig, ((block * self.a + self.b) % _PRIME).min(axis=0), out=sig)
        return sig


@dataclass
class Clusters:
    keep: np.ndarray
    """(documents,) bool: False for every near-duplicate that is not its cluster's survivor."""
    cluster: np.ndarray
    """(documents,) int: index of the cluster's survivor (a document alone is its own cluster)."""

    def stats(self) -> dict:
        sizes = np.bincount(self.cluster)
        sizes = sizes[sizes > 1]
        hist: dict[str, int] = {}
        for s in sizes.tolist():
            key = str(s) if s < 10 else "10+"
            hist[key] = hist.get(key, 0) + 1
        return {
            "documents": int(len(self.keep)),
            "removed": int((~self.keep).sum()),
            "clusters": int(len(sizes)),
            "largest_cluster": int(sizes.max()) if len(sizes) else 1,
            "cluster_sizes": dict(sorted(hist.items())),
        }


def lsh_clusters(signatures: np.ndarray, *, bands: int, rows: int) -> Clusters:
    """Cluster documents (rows of `signatures`, in read order) that share any LSH band bucket."""
    n = len(signatures)
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for b in range(bands):
        band = np.ascontiguousarray(signatures[:, b * rows : (b + 1) * rows])
        keys = band.view(np.dtype((np.void, band.dtype.itemsize * rows))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        leader = first[inverse.ravel()]  # the first document in read order with the same bucket
        for i in np.nonzero(leader != np.arange(n))[0].tolist():
            ri, rl = find(i), find(int(leader[i]))
            if ri != rl:
                parent[max(ri, rl)] = min(ri, rl)  # the smaller index (earlier document) stays root
    cluster = np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
    return Clusters(keep=cluster == np.arange(n), cluster=cluster)
