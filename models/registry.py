"""Model families and sizes by short registered names (CONVENTIONS 5): `resolve_arch(family, size, **overrides)`
is the single entry from a config to a validated `Arch`."""

from __future__ import annotations

from collections.abc import Callable

from models import deepseek, gemma2, llama, mistral, qwen2
from models.arch import Arch
from train.errors import ConfigError

FAMILIES: dict[str, Callable[[], dict[str, Arch]]] = {
    "llama3": llama.sizes,
    "mistral": mistral.mistral_sizes,
    "mixtral": mistral.mixtral_sizes,
    "qwen2": qwen2.sizes,
    "gemma2": gemma2.sizes,
    "deepseek_v2": deepseek.sizes,
}


def sizes(family: str) -> dict[str, Arch]:
    if family not in FAMILIES:
        raise ConfigError("model.family", family, f"choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]()


def resolve_arch(family: str, size: str, *, max_seq_length: int | None = None, **overrides: object) -> Arch:
    """The validated architecture of `family`/`size` with `overrides` (field name -> value; `rope`, `moe`, `mla`
    take dicts of their own fields). Raises ConfigError naming the bad field."""
    table = sizes(family)
    if size not in table:
        raise ConfigError("model.size", size, f"choose one of {', '.join(table)}")
    return table[size].replace(**overrides).validate(max_seq_length=max_seq_length)
