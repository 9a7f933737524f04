"""Packing: documents -> token ids -> a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`), one
end-of-document token after each document, uint16 when the vocabulary fits (else int32).

Encoding runs in a process pool (each worker loads the SentencePiece model once) over chunks of
documents; chunks come back in order, so the dataset's document order is the input order whatever the
number of workers.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

CHUNK_DOCS = 256
_SP = None


_EOD = 0
_DTYPE = np.uint16


def _init(model_path: str, eod: int = 0, dtype=np.uint16) -> None:
    global _SP, _EOD, _DTYPE
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_path)
    _EOD, _DTYPE = eod, dtype


def _encode(texts: list[str]) -> list[list[int]]:
    return _SP.encode(texts, num_threads=1)  # one core per process: the pool gives the parallelism


def _encode_packed(texts: list[str]) -> tuple[bytes, list[int]]:
    """A chunk as the bytes of its token ids, an end-of-document token after each document, and the
    documents' lengths (the work `IndexedDatasetBuilder.add_document` does per document)."""
    ids = _encode(texts)
    lengths = [len(x) + 1 for x in ids]
    flat = np.concatenate([np.array(x + [_EOD], dtype=_DTYPE) for x in ids]) if ids else np.zeros(0, _DTYPE)
    return flat.tobytes(), lengths


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def pack(
    texts: list[str], prefix: str, *, model_path: str, vocab_size: int, eod: int, workers: int = 1
) -> dict:
    """Write `prefix`.bin/.idx; returns {"documents", "tokens", "seconds", "dtype"}."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.time()
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    tokens = 0
    chunks = [texts[i : i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(model_path, eod, dtype))
        results = pool.imap(_encode_packed, chunks)  # in order: the dataset keeps the input order
    else:
        pool = None
        _init(model_path, eod, dtype)
        results = map(_encode_packed, chunks)
    try:
        for buf, lengths in results:
            # Equivalent to builder.add_document(doc, [len(doc)]) for each document of the chunk.
            builder.data_file.write(buf)
            for n in lengths:
                builder.sequence_lengths.append(n)
                builder.document_indices.append(len(builder.sequence_lengths))
            tokens += sum(lengths)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    builder.finalize(prefix + ".idx")
    return {
        "documents": len(texts),
        "tokens": tokens,
        "dtype": np.dtype(dtype).name,
        "seconds": round(time.time() - start, 3),
    }
