"""Mistral 7B (Jiang et al. 2023) and Mixtral 8x7B / 8x22B (Jiang et al. 2024): Llama-style blocks with GQA;
Mistral 7B v0.1 uses a 4096-token sliding window on every layer; Mixtral replaces each MLP by 8 SwiGLU experts
with top-2 routing (softmax over the two chosen logits). Figures from the HF config.json of each release."""

from __future__ import annotations

from models.arch import Arch, MoE

MISTRAL_VOCAB = 32_000


def mistral_sizes() -> dict[str, Arch]:
    return {
        "tiny": Arch(4, 256, 8, 2, 704, rope_theta=10_000.0, sliding_window=64),
        # mistralai/Mistral-7B-v0.1: 32 x 4096, 32 heads, 8 KV, FFN 14336, window 4096, theta 1e4.
        "7B": Arch(
            32,
            4096,
            32,
            8,
            14336,
            rope_theta=10_000.0,
            sliding_window=4096,
            vocab_size=MISTRAL_VOCAB,
            max_position_embeddings=32_768,
        ),
    }


def _mixtral_moe(ffn: int, **kw) -> MoE:
    return MoE(num_experts=8, top_k=2, ffn_hidden_size=ffn, norm_topk_prob=True, aux_loss_coeff=0.02, **kw)


def mixtral_sizes() -> dict[str, Arch]:
    return {
        "tiny": Arch(4, 256, 8, 2, 512, rope_theta=1e6, moe=_mixtral_moe(512)),
        # mistralai/Mixtral-8x7B-v0.1: 32 x 4096, 32 heads, 8 KV, 8 experts of 14336, top-2, theta 1e6.
        "8x7B": Arch(
            32,
            4096,
            32,
            8,
            14336,
            rope_theta=1e6,
            norm_eps=1e-5,
            vocab_size=MISTRAL_VOCAB,
            max_position_embeddings=32_768,
            moe=_mixtral_moe(14336),
        ),
        # mistralai/Mixtral-8x22B-v0.1: 56 x 6144, 48 heads, 8 KV, 8 experts of 16384, top-2, theta 1e6.
        "8x22B": Arch(
            56,
            6144,
            48,
            8,
            16384,
            rope_theta=1e6,
            vocab_size=MISTRAL_VOCAB,
            max_position_embeddings=65_536,
            moe=_mixtral_moe(16384),
        ),
    }
