"""Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3): pre-norm RMSNorm, RoPE (theta 500k),
SwiGLU MLP, grouped-query attention with 8 KV heads, no biases, untied embeddings, 128,256-token vocabulary.

Sizes are code (CONVENTIONS 6). The model itself is built by `models.gpt.build_model` from an `Arch`.
"""

from __future__ import annotations

from models.arch import Arch, RopeScaling

LLAMA3_VOCAB = 128_256


def llama_ffn_size(hidden: int, *, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """SwiGLU width as in Llama: 2/3 of 4h (same FLOPs as a 4h GELU MLP), times a multiplier,
    rounded up to a multiple (Llama 3 8B: h=4096, x1.3, multiple 1024 -> 14336)."""
    width = int(multiplier * int(2 * 4 * hidden / 3))
    return multiple_of * -(-width // multiple_of)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the embedding so every tensor-parallel shard has the same, aligned size."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def _llama3(layers: int, hidden: int, heads: int, ffn: int, **kw) -> Arch:
    return Arch(layers, hidden, heads, 8, ffn, vocab_size=LLAMA3_VOCAB, **kw)


def sizes() -> dict[str, Arch]:
    # Llama 3.1 rope scaling (HF config.json of Meta-Llama-3.1-*: rope_type llama3, factor 8, low 1, high 4, 8192).
    llama31 = RopeScaling(
        kind="llama3", factor=8.0, original_context=8192, low_freq_factor=1.0, high_freq_factor=4.0
    )
    return {
        # A few M parameters: the CPU main job and the tests.
        "tiny": Arch(4, 256, 8, 2, llama_ffn_size(256, multiple_of=64), rope_theta=10_000.0),
        # Two layers, 64 wide: unit tests.
        "debug": Arch(2, 64, 4, 2, llama_ffn_size(64, multiple_of=32), rope_theta=10_000.0),
        # Dubey et al. 2024, Table 3 (Llama 3, 8k context).
        "8B": _llama3(32, 4096, 32, llama_ffn_size(4096, multiplier=1.3, multiple_of=1024)),
        "70B": _llama3(80, 8192, 64, llama_ffn_size(8192, multiplier=1.3, multiple_of=4096)),
        # 405B was released as Llama 3.1 (128k context through llama3 RoPE scaling).
        "405B": _llama3(
            126,
            16384,
            128,
            llama_ffn_size(16384, multiplier=1.2, multiple_of=4096),
            rope=llama31,
            max_position_embeddings=131_072,
        ),
    }
