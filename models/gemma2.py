"""Gemma 2 (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size", Table 1):
GeGLU MLP, RMSNorm before and after both attention and MLP ("sandwich"), (1 + weight) RMSNorm, embeddings
scaled by sqrt(d) and tied, local (4096-token sliding window) and global attention layers alternating,
attention logits soft-capped at 50 and final logits at 30, GQA, head dim 256 (128 for 27B), 256k vocabulary.
Figures from the HF config.json of google/gemma-2-{2b,9b,27b}."""

from __future__ import annotations

from models.arch import Arch

GEMMA_VOCAB = 256_000


def _gemma2(layers: int, hidden: int, heads: int, kv: int, ffn: int, head_dim: int, **kw) -> Arch:
    base = dict(
        rope_theta=10_000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        kv_channels=head_dim,
        activation="geglu",
        sandwich_norm=True,
        norm_zero_centered=True,
        embedding_scale=True,
        window_every=2,
        attn_softcap=50.0,
        final_softcap=30.0,
        query_pre_attn_scalar=float(head_dim),
    )
    base.update(kw)
    return Arch(layers, hidden, heads, kv, ffn, **base)


def sizes() -> dict[str, Arch]:
    full = dict(sliding_window=4096, vocab_size=GEMMA_VOCAB, max_position_embeddings=8192)
    return {
        "tiny": _gemma2(4, 256, 8, 4, 1024, 32, sliding_window=64),
        "2B": _gemma2(26, 2304, 8, 4, 9216, 256, **full),
        "9B": _gemma2(42, 3584, 16, 8, 14336, 256, **full),
        # 27B scales queries by (d / heads)^-0.5 = 144^-0.5, not head_dim^-0.5.
        "27B": _gemma2(46, 4608, 32, 16, 36864, 128, query_pre_attn_scalar=144.0, **full),
    }
