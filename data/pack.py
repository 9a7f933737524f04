"""Packing: documents -> token ids -> a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`), one
end-of-document token after each document, uint16 when the vocabulary fits (else int32).

Encoding runs in a process pool (each worker loads the SentencePiece model once) over chunks of
documents; chunks come back in order, so the dataset's document order is the input order whatever the
number of workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)

CHUNK_DOCS = 256
_SP = None


def _init(model_path: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _SP.encode(texts)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def encode_documents(texts: list[str], *, model_path: str, workers: int = 1) -> Iterator[list[int]]:
    """Token ids of each text (no end-of-document token), in input order."""
    chunks = [texts[i : i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(model_path,)) as pool:
            for ids in pool.imap(_encode, chunks):
                yield from ids
        return
    _init(model_path)
    for chunk in chunks:
        yield from _encode(chunk)


def pack(
    texts: list[str], prefix: str, *, model_path: str, vocab_size: int, eod: int, workers: int = 1
) -> dict:
    """Write `prefix`.bin/.idx; returns {"documents", "tokens", "seconds", "dtype"}."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.time()
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    tokens = 0
    for ids in encode_documents(texts, model_path=model_path, workers=workers):
        arr = np.asarray(ids + [eod], dtype=dtype)
        builder.add_document(arr, [len(arr)])
        tokens += len(arr)
    builder.finalize(prefix + ".idx")
    return {
        "documents": len(texts),
        "tokens": tokens,
        "dtype": np.dtype(dtype).name,
        "seconds": round(time.time() - start, 3),
    }
