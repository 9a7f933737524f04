"""MinHash dedup speed and recall on planted near-duplicates, and tokenization + packing throughput vs
the raw SentencePiece encode rate on the same text.

    .venv/bin/python bench/data_dedup.py [--docs 3000]

Near-duplicates: a copy of every other document with 1% (then 5%, 10%) of its words replaced, keeping
whitespace. Recall: the share of copies that end in their original's cluster. Speed: documents per
CPU-second for signatures (5-gram shingles, 14 bands x 8 rows) plus LSH clustering.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data.dedup import MinHasher, lsh_clusters  # noqa: E402


def _edit(text: str, rate: float, rng: random.Random) -> str:
    pieces = re.split(r"(\s+)", text)
    words = list(range(0, len(pieces), 2))
    for j in rng.sample(words, max(1, int(rate * len(words)))):
        pieces[j] = f"w{rng.randrange(10**6)}"
    return "".join(pieces)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    args = ap.parse_args()
    from data.samples import mixed_corpus

    originals = [d for d in mixed_corpus(args.docs) if len(d.split()) >= 50]
    print(f"{len(originals)} originals of 50+ words\n")
    print(
        "| edits | documents | docs/CPU-s (signatures + LSH) | recall | originals removed (clustered with an earlier document) |"
    )
    print("|---|---|---|---|---|")
    for rate in (0.01, 0.05, 0.10):
        rng = random.Random(0)
        texts = list(originals)
        copies = {}
        for i in range(0, len(originals), 2):
            copies[len(texts)] = i
            texts.append(_edit(originals[i], rate, rng))
        hasher = MinHasher()
        t = time.process_time()
        sig = np.stack([hasher.signature(x) for x in texts])
        clusters = lsh_clusters(sig, bands=14, rows=8)
        seconds = time.process_time() - t
        recall = np.mean([clusters.cluster[c] == clusters.cluster[o] for c, o in copies.items()])
        lost = sum(not clusters.keep[o] for o in range(len(originals)))
        print(f"| {rate:.0%} | {len(texts)} | {len(texts) / seconds:,.0f} | {recall:.3f} | {lost} |")

    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401  (import outside timings)

    from data.pack import pack
    from data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = train_tokenizer(
            originals,
            model_prefix=os.path.join(tmp, "tok"),
            vocab_size=4096,
            model_type="bpe",
            byte_fallback=True,
        )
        sp = spm.SentencePieceProcessor(model_file=model)
        t = time.process_time()
        raw = sum(len(x) for x in sp.encode(originals, num_threads=1))
        raw_rate = raw / (time.process_time() - t)
        t = time.process_time()
        out = pack(originals, os.path.join(tmp, "p1"), model_path=model, vocab_size=4096, eod=1, workers=1)
        one = out["tokens"] / (time.process_time() - t)
        t = time.perf_counter()
        out2 = pack(originals, os.path.join(tmp, "p2"), model_path=model, vocab_size=4096, eod=1, workers=2)
        two_wall = out2["tokens"] / (time.perf_counter() - t)
    print("\n| step | tokens | tokens/s | vs raw sentencepiece encode (1 thread) |")
    print("|---|---|---|---|")
    print(f"| raw `sp.encode`, 1 thread (per CPU-second) | {raw:,} | {raw_rate:,.0f} | 1.00x |")
    print(
        f"| encode + pack to .bin/.idx, 1 process (per CPU-second) | {out['tokens']:,} | {one:,.0f} | {one / raw_rate:.2f}x |"
    )
    print(
        f"| encode + pack, 2 worker processes (wall, pool start included) | {out2['tokens']:,} | {two_wall:,.0f} | {two_wall / raw_rate:.2f}x |"
    )


if __name__ == "__main__":
    main()
