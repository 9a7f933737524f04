"""The `data` config group's schema (CONVENTIONS 4): sources, normalization, filters, dedup, language id,
PII, tokenizer, and how the work is split into shards. `train/config.py` composes `DataConfig` into the
run's config; `python -m data` (configs/data_app.yaml) uses it alone.

Every field that changes the prepared data is part of the data config's hash (data/prepare.py), except
where the data is cached and which shard this process works on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from train.errors import ConfigError

SOURCE_KINDS = ("python_stdlib", "package_docs", "files", "hf")
FILE_FORMATS = ("auto", "jsonl", "parquet", "text")
C4_VARIANTS = ("datatrove", "reference")


@dataclass
class SourceConfig:
    kind: str = "files"
    """python_stdlib (the interpreter's own .py sources), package_docs (README/.md/.rst and METADATA
    descriptions of installed packages), files (the `paths` globs: .jsonl[.gz|.zst], .parquet, else plain
    text) or hf (local files through HF `datasets.load_dataset("json"|"parquet", data_files=paths)`)."""
    paths: list[str] = field(default_factory=list)
    """Globs read by kind=files and kind=hf (`**` allowed)."""
    format: str = "auto"
    """kind=files: auto (by file name), jsonl, parquet or text."""
    text_field: str = "text"
    """Field holding the document text in JSONL, parquet and HF records."""
    html: bool = False
    """The text is HTML: extract the main text with trafilatura (data/html.py) before anything else."""
    max_docs: int | None = None
    """Keep at most this many documents (after sorting inputs by path, so the choice is deterministic)."""
    max_bytes: int | None = None
    """Stop reading once this many UTF-8 bytes of documents are kept."""
    filter: bool = True
    """Apply data.filters to this source (code and other non-prose sources usually set false)."""
    languages: list[str] = field(default_factory=list)
    """Allowed languages (ISO 639-1 codes, e.g. [en, de]); empty keeps every language (no language id)."""
    language_threshold: float = 0.65
    """With `languages`: drop documents whose top language score is below this (FineWeb uses 0.65)."""
    max_repetition: float = 4.0
    """Most epochs of this source any stage's mix may use (Muennighoff et al. 2023: up to ~4 is near-free)."""


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    """SentencePiece vocabulary size before padding (the model pads it to a multiple of 128)."""
    model_type: str = "bpe"
    """SentencePiece model type: bpe or unigram."""
    byte_fallback: bool = True
    """Unknown characters become UTF-8 byte tokens, so no text is ever <unk>."""
    train_bytes: int = 8_000_000
    """Bytes of text (sampled evenly over sources) used to train the tokenizer."""
    special_tokens: list[str] = field(default_factory=list)
    """User-defined special pieces, each kept whole (e.g. [<|bos|>, <|pad|>, <|im_start|>, <|im_end|>])."""
    model_path: str | None = None
    """Load this existing SentencePiece `.model` instead of training one."""


@dataclass
class GopherQualityConfig:
    """Gopher quality rules (Rae et al. 2021, arXiv:2112.11446, section A.1.1); datatrove's defaults."""

    enabled: bool = False
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    """Minimum share of words with at least one alphabetic character (datatrove's name kept)."""
    min_stop_words: int = 2


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules (Rae et al. 2021, Table A1)."""

    enabled: bool = False
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_n_grams: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


@dataclass
class C4Config:
    """C4 rules (Raffel et al. 2020, section 2.2). variant=datatrove: datatrove's C4QualityFilter defaults
    (citations removed, policy lines dropped, sentence count by tokenizer); variant=reference: TFDS
    `c4_utils.py` clean_page (no citation removal, policy lines drop the page, 5 lines of 3+ words)."""

    enabled: bool = False
    variant: str = "datatrove"
    filter_no_terminal_punct: bool = True
    """FineWeb runs C4 with this false (its ablations found the line rule removes too much)."""
    min_num_sentences: int | None = None
    """Pages with fewer sentences are dropped (-1 disables); null: the variant's (datatrove 5, reference 3)."""
    min_words_per_line: int | None = None
    """Shorter lines are removed; null: the variant's (datatrove 3, reference 5)."""
    max_word_length: int = 1000
    """Lines with a longer word are removed (-1 disables)."""


@dataclass
class FineWebConfig:
    """FineWeb's extra quality rules (Penedo et al. 2024, section 3.3.2)."""

    enabled: bool = False
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclass
class FiltersConfig:
    """Quality filters, applied in FineWeb's order: Gopher repetition, Gopher quality, C4, FineWeb."""

    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalized text (whitespace collapsed, case folded) was seen before."""
    minhash: bool = False
    """Near-duplicate removal with MinHash LSH across all shards of a source (data/dedup.py)."""
    ngram: int = 5
    """Word n-gram (shingle) size (FineWeb: 5)."""
    bands: int = 14
    """LSH bands (FineWeb: 14)."""
    rows: int = 8
    """Hashes per band (FineWeb: 8); bands x rows signatures per document."""
    seed: int = 1
    """Seed of the MinHash permutations."""


@dataclass
class PIIConfig:
    emails: bool = False
    """Replace email addresses with `email@example.com` (FineWeb's PIIFormatter)."""
    ips: bool = False
    """Replace public IPv4/IPv6 addresses with `22.214.171.124` (FineWeb's PIIFormatter)."""


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Named sources; stage mixes refer to these names."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    cache_dir: str = "${run_dir}/data"
    """Where prepared data lives; each preparation goes in a subdirectory named by the data config's hash."""
    min_chars: int = 64
    """Drop documents shorter than this many characters after normalization."""
    max_doc_bytes: int = 100_000_000
    """Skip (and count) documents larger than this many UTF-8 bytes."""
    valid_percent: int = 2
    """Percent of each source's documents held out for validation."""
    seed: int = 1234
    """Seed of the blended dataset's sample order."""
    workers: int = 1
    """Processes used for the per-shard steps (filtering, signatures, packing)."""
    shard_index: int = 0
    """This process's shard of the inputs (a Slurm array task passes $SLURM_ARRAY_TASK_ID)."""
    num_shards: int = 1
    """Input files of every source are split round-robin into this many shards."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources", {}, "name at least one source, e.g. data=default")
        for name, src in self.sources.items():
            key = f"data.sources.{name}"
            if src.kind not in SOURCE_KINDS:
                raise ConfigError(f"{key}.kind", src.kind, f"choose one of {', '.join(SOURCE_KINDS)}")
            if src.kind in ("files", "hf") and not src.paths:
                raise ConfigError(f"{key}.paths", [], f"kind={src.kind} needs at least one path or glob")
            if src.format not in FILE_FORMATS:
                raise ConfigError(f"{key}.format", src.format, f"choose one of {', '.join(FILE_FORMATS)}")
            if not 0 <= src.language_threshold <= 1:
                raise ConfigError(
                    f"{key}.language_threshold", src.language_threshold, "use a score in [0, 1]"
                )
            if src.max_repetition < 1:
                raise ConfigError(f"{key}.max_repetition", src.max_repetition, "must be >= 1 (epochs)")
        tok = self.tokenizer
        if tok.model_type not in ("bpe", "unigram"):
            raise ConfigError("data.tokenizer.model_type", tok.model_type, "choose bpe or unigram")
        if not 256 < tok.vocab_size <= 65_000:
            raise ConfigError(
                "data.tokenizer.vocab_size", tok.vocab_size, "use 257..65000 (uint16 token files)"
            )
        if self.filters.c4.variant not in C4_VARIANTS:
            raise ConfigError(
                "data.filters.c4.variant", self.filters.c4.variant, f"choose one of {', '.join(C4_VARIANTS)}"
            )
        if self.dedup.ngram < 1 or self.dedup.bands < 1 or self.dedup.rows < 1:
            raise ConfigError(
                "data.dedup",
                f"ngram={self.dedup.ngram} bands={self.dedup.bands} rows={self.dedup.rows}",
                "all must be >= 1 (FineWeb: ngram=5 bands=14 rows=8)",
            )
        if not 0 < self.valid_percent < 50:
            raise ConfigError("data.valid_percent", self.valid_percent, "use a percent between 1 and 49")
        if self.workers < 1:
            raise ConfigError("data.workers", self.workers, "must be >= 1")
        if self.num_shards < 1:
            raise ConfigError("data.num_shards", self.num_shards, "must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                "data.shard_index", self.shard_index, f"must be in [0, data.num_shards={self.num_shards})"
            )
