"""Qwen2 (Yang et al. 2024, "Qwen2 Technical Report", Table 1): Llama-style blocks with biases on the q, k, v
projections, GQA, RoPE theta 1e6, RMSNorm eps 1e-6; the 0.5B ties its embeddings. Figures from the HF
config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-7B."""

from __future__ import annotations

from models.arch import Arch


def _qwen2(layers: int, hidden: int, heads: int, kv: int, ffn: int, **kw) -> Arch:
    return Arch(layers, hidden, heads, kv, ffn, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, **kw)


def sizes() -> dict[str, Arch]:
    return {
        "tiny": _qwen2(4, 256, 8, 2, 704, tie_embeddings=True),
        "0.5B": _qwen2(
            24, 896, 14, 2, 4864, tie_embeddings=True, vocab_size=151_936, max_position_embeddings=32_768
        ),
        "7B": _qwen2(28, 3584, 28, 4, 18944, vocab_size=152_064, max_position_embeddings=131_072),
    }
