"""Quality filters vs datatrove 0.10.1 on the same real documents: decisions and speed.

    .venv/bin/python bench/data_filters.py [--docs 6000]

Corpus: data/samples.py `mixed_corpus` (package docs, Debian fortunes in 8 languages, the Debian
handbook's pages through trafilatura). For each filter: identical keep/drop decisions (and, for C4, the
same rewritten text), documents per CPU-second for datatrove and for Kiln, and the ratio. Kiln's caches
(chunk tokens, spaced words, word counts) start empty for every filter ("cold"), so no filter profits
from another's tokenization; "warm" is a second pass over the same documents (every chunk cached, what a
long run converges to). The chain row runs all four on one shared tokenization, as `python -m data` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data.config import C4Config, FiltersConfig, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig  # noqa: E402
from data.filters import C4Lines, DocText, FilterChain, FineWebQuality, GopherQuality, GopherRepetition  # noqa: E402
from data.filters import text as ftext  # noqa: E402


def _cpu(fn, docs):
    t = time.process_time()
    out = [fn(d) for d in docs]
    return out, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=6000)
    args = ap.parse_args()
    from datatrove.data import Document
    from datatrove.pipeline import filters as dt

    from data.samples import mixed_corpus

    docs = mixed_corpus(args.docs)

    def ref_fn(f):
        def run(text):
            d = Document(text=text, id="x")
            r = f.filter(d)
            return ("keep", d.text) if r is True else (r[1], None)

        return run

    def ours_fn(f):
        if isinstance(f, C4Lines):
            return lambda t: (lambda r: (r[1] or "keep", r[0]))(f.clean(t))
        return lambda t: (f(DocText(t)) or "keep", None)

    pairs = [
        ("GopherQuality", dt.GopherQualityFilter(), GopherQuality(GopherQualityConfig())),
        ("GopherRepetition", dt.GopherRepetitionFilter(), GopherRepetition(GopherRepetitionConfig())),
        ("C4 (datatrove defaults)", dt.C4QualityFilter(), C4Lines(C4Config())),
        ("FineWeb", dt.FineWebQualityFilter(), FineWebQuality(FineWebConfig())),
    ]
    # Load spaCy and build each side's one-time tables outside the timings (datatrove loads spaCy inside
    # its first call; Kiln also compiles spaCy's patterns for its C tokenizer, ~0.4 s).
    ref_fn(pairs[0][1])("warm up spaCy in datatrove too.")
    for _, _, ours in pairs:
        ours_fn(ours)("Warm up spaCy in Kiln too. It has a second sentence.")
    rows = []
    ref_total = 0.0
    for name, ref, ours in pairs:
        ref_out, ref_s = _cpu(ref_fn(ref), docs)
        ftext.clear_caches()
        our_out, our_s = _cpu(ours_fn(ours), docs)
        _, warm_s = _cpu(ours_fn(ours), docs)  # the same documents again: every chunk already cached
        # Same decision, and for C4 (a line filter) the same rewritten text when kept.
        same = sum(r[0] == o[0] and (o[1] is None or r[1] == o[1]) for r, o in zip(ref_out, our_out))
        dropped = sum(r[0] != "keep" for r in ref_out)
        ref_total += ref_s
        rows.append(
            (name, same, dropped, len(docs) / ref_s, len(docs) / our_s, ref_s / our_s, ref_s / warm_s)
        )
    cfg = FiltersConfig()
    cfg.gopher_repetition.enabled = cfg.gopher_quality.enabled = cfg.c4.enabled = cfg.fineweb.enabled = True
    ftext.clear_caches()
    _, chain_s = _cpu(FilterChain(cfg), docs)
    print(f"{len(docs)} documents ({sum(map(len, docs)) / len(docs):,.0f} characters on average)\n")
    print(
        "| filter | identical decisions | dropped (datatrove) | datatrove docs/CPU-s | Kiln docs/CPU-s (cold) "
        "| ratio cold | ratio warm |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, same, dropped, r, o, x, w in rows:
        print(
            f"| {name} | {same}/{len(docs)} ({100 * same / len(docs):.2f}%) | {dropped} | {r:,.0f} | {o:,.0f} "
            f"| {x:.1f}x | {w:.1f}x |"
        )
    print(
        f"| all four, one pass (Kiln chain vs datatrove's four runs) | - | - | {len(docs) / ref_total:,.0f} | "
        f"{len(docs) / chain_s:,.0f} | {ref_total / chain_s:.1f}x | - |"
    )


if __name__ == "__main__":
    main()
