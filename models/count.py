"""Parameter counts of an `Arch`, total and active per token: the one parameter count of the repository.

Counted from the weights `models.gpt.build_model` creates (tests/models/test_count.py checks the two agree), with
the published vocabulary unless one is given. Active = what one token uses: all dense weights plus top_k routed
experts and the shared experts of each MoE layer (the embedding row is counted whole, as model cards do).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.arch import Arch
from train.errors import ConfigError


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    output: int
    """The LM head (0 when tied to the embedding)."""
    attention: int
    mlp: int
    """Dense MLPs, shared experts and routers; routed experts are in `experts`."""
    experts: int
    """All routed experts of all MoE layers."""
    active_experts: int
    """The top_k routed experts a token goes through, over all MoE layers."""
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.attention + self.mlp + self.experts + self.norms

    @property
    def active(self) -> int:
        return self.total - self.experts + self.active_experts

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def attention_params(arch: Arch) -> int:
    """Weights of one attention block (biases included)."""
    h, heads = arch.hidden_size, arch.num_attention_heads
    if arch.mla is not None:
        m = arch.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            q = h * heads * qk
        else:  # down, norm, up (DeepSeek-V2 eq. 12)
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * qk
        kv_down = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # + kv norm (eq. 9, 14)
        kv_up = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv_down + kv_up + heads * m.v_head_dim * h
    q, kv = heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    bias = q + 2 * kv if arch.qkv_bias else 0
    return h * q + 2 * h * kv + q * h + bias


def param_count(arch: Arch, *, vocab_size: int | None = None) -> ParamCount:
    """Parameter count of `arch` with `vocab_size` (default: the arch's published vocabulary)."""
    vocab = vocab_size or arch.vocab_size
    if not vocab:
        raise ConfigError(
            "vocab_size", vocab_size, "give the vocabulary size (this size has no published one)"
        )
    h, L = arch.hidden_size, arch.num_layers
    gate = 3  # gated MLP: W_gate, W_up (h -> f), W_down (f -> h)
    moe_layers = sum(arch.is_moe_layer(i) for i in range(L))
    dense_layers = L - moe_layers
    mlp = dense_layers * gate * h * arch.ffn_hidden_size
    experts = active = 0
    if arch.moe is not None:
        m = arch.moe
        router = h * m.num_experts  # the expert bias (aux-loss-free) is a buffer, not a parameter
        mlp += moe_layers * (router + gate * h * m.shared_ffn_hidden_size)
        experts = moe_layers * m.num_experts * gate * h * m.ffn_hidden_size
        active = moe_layers * m.top_k * gate * h * m.ffn_hidden_size
    norms_per_layer = 4 if arch.sandwich_norm else 2
    return ParamCount(
        embedding=vocab * h,
        output=0 if arch.tie_embeddings else vocab * h,
        attention=L * attention_params(arch),
        mlp=mlp,
        experts=experts,
        active_experts=active,
        norms=L * norms_per_layer * h + h,
    )
