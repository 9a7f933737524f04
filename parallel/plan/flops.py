"""Parameters and training FLOPs per token of a decoder (dense or MoE, GQA or MLA), and MFU defined on them.

Two published conventions, which differ only in the attention-score term:
- `megatron`: Megatron-LM `num_floating_point_operations` (megatron/training/training.py; Narayanan et al. 2021,
  Appendix "Floating-point operations"): matmuls only, 3 GEMMs per weight (forward, dgrad, wgrad) x 2 FLOPs per
  multiply-add, MoE layers count the `top_k` routed experts plus shared experts, the logits GEMM is counted even
  with tied embeddings, and only half of the causal score matrix is counted ("Only half of the attention matrix
  is non-zero").
- `torchtitan`: `6 * (parameters - embedding) + 12 * layers * heads * head_dim * seq` (torchtitan
  `models/utils.py get_dense_model_nparams_and_flops` / llama3 `get_nparams_and_flops`: the full score matrix,
  norm weights inside the 6N term; for MoE the active parameters replace N).
MFU = achieved model FLOP/s (tokens/s x FLOPs per token) / peak FLOP/s of the hardware used (PaLM, Chowdhery et
al. 2022, Appendix B; the same definition in Megatron-LM's `throughput` log and torchtitan's `mfu` metric).

Parameter counting lives in ONE function, `param_count`, so that the general model counter (models/count.py)
can replace it in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.errors import ConfigError


@dataclass(frozen=True)
class PlanArch:
    """What the planner needs of an architecture. Dense GQA when `num_experts == 0` and `kv_lora_rank == 0`."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    """Dense MLP width (SwiGLU: the width of W1/W3)."""
    head_dim: int = 0
    """0 = hidden_size / num_attention_heads."""
    tie_embeddings: bool = False
    gated_mlp: bool = True
    """SwiGLU (3 weight matrices) or a GELU MLP (2, GPT)."""
    # MoE (Mixtral, DeepSeekMoE): layers >= first_dense_layers use experts.
    num_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden_size: int = 0
    """Width of one routed expert (0 = ffn_hidden_size)."""
    shared_expert_ffn_hidden_size: int = 0
    """Total width of the always-on shared experts (DeepSeekMoE)."""
    first_dense_layers: int = 0
    # MLA (DeepSeek-V2, Sec. 2.1): low-rank KV (and optionally Q) with a decoupled RoPE key.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    """0 = queries projected directly from the hidden state."""
    qk_head_dim: int = 0
    """Per-head query/key dimension without the RoPE part."""
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def score_dims(self) -> tuple[int, int]:
        """(query-key dim, value dim) per head, summed over heads: the widths of QK^T and scores x V."""
        a = self.num_attention_heads
        if self.is_mla:
            return a * (self.qk_head_dim + self.qk_rope_head_dim), a * self.v_head_dim
        return a * self.head_size, a * self.head_size


def as_plan_arch(arch: object) -> PlanArch:
    """A PlanArch from a PlanArch, a `models.llama.LlamaArch`, or any object with the same attribute names."""
    if isinstance(arch, PlanArch):
        return arch
    fields = {f: getattr(arch, f) for f in PlanArch.__dataclass_fields__ if hasattr(arch, f)}
    if "head_dim" not in fields and hasattr(arch, "head_dim"):
        fields["head_dim"] = arch.head_dim
    return PlanArch(**fields)


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    output: int
    """The LM head (0 when tied to the embedding)."""
    attention: int
    mlp: int
    """All MLP weights: dense layers, every routed expert, shared experts, routers."""
    norms: int
    mlp_active: int = -1
    """MLP weights one token uses (dense layers, top_k routed experts, shared experts, routers); -1 = mlp."""
    experts: int = 0
    """Routed-expert weights, a part of `mlp` (what expert parallelism shards)."""

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.attention + self.mlp + self.norms

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active(self) -> int:
        """Parameters a token passes through (MoE: top_k of the routed experts)."""
        return self.total - self.mlp + (self.mlp if self.mlp_active < 0 else self.mlp_active)


def param_count(arch: object, *, vocab_size: int) -> ParamCount:
    """Weights of a decoder without biases: attention (GQA or MLA), SwiGLU MLPs (dense or MoE), RMSNorms."""
    a = as_plan_arch(arch)
    h, L = a.hidden_size, a.num_layers
    if a.is_mla:  # DeepSeek-V2 Sec. 2.1.2-2.1.3 (and Megatron theoretical_memory_usage.py, MLA branch)
        qk = a.qk_head_dim + a.qk_rope_head_dim
        heads = a.num_attention_heads
        q = (
            a.q_lora_rank * (h + heads * qk) + a.q_lora_rank  # W_DQ, W_UQ (incl. rope part), q norm
            if a.q_lora_rank
            else h * heads * qk
        )
        kv = (
            a.kv_lora_rank * (h + heads * (a.qk_head_dim + a.v_head_dim)) + a.kv_lora_rank
        )  # W_DKV, W_UK/UV, norm
        per_layer_attn = q + kv + h * a.qk_rope_head_dim + heads * a.v_head_dim * h  # + W_KR, W_O
    else:
        qd, kvd = a.num_attention_heads * a.head_size, a.num_kv_heads * a.head_size
        per_layer_attn = h * qd + 2 * h * kvd + qd * h  # Wq, Wk, Wv, Wo
    swiglu = (3 if a.gated_mlp else 2) * h  # W1, W3 (h -> f), W2 (f -> h); GELU: no W3
    dense_mlp = (L - a.moe_layers) * swiglu * a.ffn_hidden_size
    shared = a.moe_layers * swiglu * a.shared_expert_ffn_hidden_size
    routers = a.moe_layers * h * a.num_experts
    experts = a.moe_layers * swiglu * a.expert_ffn * a.num_experts
    active_experts = a.moe_layers * swiglu * a.expert_ffn * a.top_k
    return ParamCount(
        embedding=vocab_size * h,
        output=0 if a.tie_embeddings else vocab_size * h,
        attention=L * per_layer_attn,
        mlp=dense_mlp + shared + routers + experts,
        norms=L * 2 * h + h,  # two RMSNorms per layer + the final one
        mlp_active=dense_mlp + shared + routers + active_experts,
        experts=experts,
    )


CONVENTIONS = ("megatron", "torchtitan")


def flops_per_token(arch: object, *, seq_length: int, vocab_size: int, convention: str = "megatron") -> float:
    """Training (forward + backward) FLOPs per token at context `seq_length`."""
    a = as_plan_arch(arch)
    n = param_count(a, vocab_size=vocab_size)
    qk, v = a.score_dims
    if convention == "megatron":
        # Every weight matrix a token passes through: 2 FLOPs x 3 GEMMs (fwd, dgrad, wgrad); routers are GEMMs too.
        linear = 6 * (n.attention + n.mlp_active + vocab_size * a.hidden_size)  # logits GEMM even when tied
        # QK^T (width qk) and scores x V (width v) over s keys, x 3 x 2, half the causal matrix.
        scores = 6 * a.num_layers * (qk + v) * seq_length / 2
        return linear + scores
    if convention == "torchtitan":
        return 6 * (n.active - n.embedding) + 6 * a.num_layers * (qk + v) * seq_length
    raise ConfigError("flops.convention", convention, f"choose one of {', '.join(CONVENTIONS)}")


def mfu(tokens_per_s: float, *, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware's peak (of all GPUs of the job)."""
    return tokens_per_s * flops_per_token / peak_flops
