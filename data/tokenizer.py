"""SentencePiece tokenizer: trained on the prepared documents, loaded through megatron-core's tokenizer
library (which gives the `eod`/`pad`/`unique_identifiers` its datasets need)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator

import sentencepiece as spm

log = logging.getLogger(__name__)

EOD_PIECE = "<eod>"
CHUNK_CHARS = 2000  # sentencepiece trains on "sentences": documents are cut at line ends into ~2k-char chunks


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.split("\n"):
            buf.append(line)
            size += len(line) + 1
            if size >= CHUNK_CHARS:
                yield "\n".join(buf)
                buf, size = [], 0
        if buf:
            yield "\n".join(buf)


def train_tokenizer(
    texts: Iterable[str],
    *,
    model_prefix: str,
    vocab_size: int,
    model_type: str,
    byte_fallback: bool,
    special_tokens: list[str] | tuple[str, ...] = (),
) -> str:
    """Train and write `<model_prefix>.model`; returns its path. Text is kept verbatim (identity
    normalization, whitespace and newlines preserved) so code round-trips exactly. `special_tokens`
    become user-defined pieces: always one token, never split, ids right after <unk> and <eod>."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        unk_id=0,
        eos_id=1,
        eos_piece=EOD_PIECE,
        bos_id=-1,
        pad_id=-1,  # no pad token: megatron-core pads with an id outside the vocabulary
        character_coverage=0.9995,
        split_digits=True,
        user_defined_symbols=list(special_tokens),
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        max_sentence_length=4 * CHUNK_CHARS,
        num_threads=2,
        minloglevel=2,
    )
    return model_prefix + ".model"


def load_tokenizer(model_path: str):
    """A megatron-core tokenizer over the SentencePiece model (tokenize, detokenize, vocab_size, eod)."""
    from megatron.core.tokenizers import MegatronTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about absent optional chat-template settings
        return MegatronTokenizer.from_pretrained(model_path, metadata_path={"library": "sentencepiece"})
