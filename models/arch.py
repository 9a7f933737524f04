"""One description of a decoder-only architecture, whatever the family: `Arch` (+ `RopeScaling`, `MoE`, `MLA`).

Sizes are code (CONVENTIONS 6): each family's module (llama.py, mistral.py, qwen2.py, gemma2.py, deepseek.py) builds
its published sizes as `Arch`s; `models.registry.resolve_arch(family, size, **overrides)` is the single entry.
`Arch.validate()` raises one `ConfigError` naming the bad field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from train.errors import ConfigError

ROPE_KINDS = ("none", "linear", "dynamic", "yarn", "llama3")
ACTIVATIONS = ("swiglu", "geglu")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE positions/frequencies are stretched past the trained context (none = plain RoPE)."""

    kind: str = "none"
    """none, linear (position interpolation, Chen et al. 2023), dynamic (NTK-aware base growth, bloc97 2023 /
    HF `_compute_dynamic_ntk_parameters`), yarn (Peng et al. 2023) or llama3 (Dubey et al. 2024, sec. 3.3 / HF
    `_compute_llama3_parameters`)."""
    factor: float = 1.0
    """Context extension factor (new context / original context)."""
    original_context: int = 8192
    """Context length the model was trained at before scaling (llama3, yarn, dynamic)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_context / low_freq_factor are divided by `factor`."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_context / high_freq_factor are kept."""
    beta_fast: float = 32.0
    """yarn: rotations at which the ramp between interpolation and extrapolation starts."""
    beta_slow: float = 1.0
    """yarn: rotations at which it ends."""
    mscale: float = 1.0
    """yarn: attention temperature coefficient (DeepSeek `mscale`)."""
    mscale_all_dim: float = 0.0
    """yarn (DeepSeek): when > 0, the softmax scale is multiplied by yarn_mscale(factor, mscale_all_dim)^2."""


@dataclass(frozen=True)
class MoE:
    """Mixture-of-experts MLP (Shazeer et al. 2017; Mixtral: Jiang et al. 2024; DeepSeekMoE: Dai et al. 2024)."""

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    """Width of each routed expert."""
    shared_ffn_hidden_size: int = 0
    """Total width of the always-on shared experts (DeepSeek: n_shared x expert width); 0 = none."""
    first_dense_layers: int = 0
    """The first layers keep a dense MLP of width Arch.ffn_hidden_size (DeepSeek `first_k_dense_replace`)."""
    norm_topk_prob: bool = True
    """Renormalize the top-k probabilities to sum to 1 (Mixtral yes, DeepSeek-V2 no)."""
    routed_scaling_factor: float = 1.0
    """Routed experts' output is multiplied by this (DeepSeek)."""
    aux_loss_coeff: float = 0.0
    """Switch-style load-balancing loss weight (Fedus et al. 2021, eq. 4)."""
    z_loss_coeff: float = 0.0
    """Router z-loss weight (Zoph et al. 2022, ST-MoE eq. 5)."""
    expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added for top-k selection only, updated by load (DeepSeek-V3)."""
    bias_update_rate: float = 1e-3
    """Step of the expert-bias update per optimizer step (DeepSeek-V3 gamma)."""
    score_function: str = "softmax"
    """Router scores: softmax (Mixtral, DeepSeek-V2) or sigmoid (DeepSeek-V3; needed by expert_bias)."""
    capacity_factor: float | None = None
    """Tokens per expert capped at capacity_factor x fair share (drop the rest); None = dropless."""


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention with decoupled RoPE (DeepSeek-V2, Liu et al. 2024, sec. 2.1)."""

    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    """None: queries are a plain projection (V2-Lite)."""
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass(frozen=True)
class Arch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    """1 = MQA (Shazeer 2019), < heads = GQA (Ainslie et al. 2023), = heads = MHA."""
    ffn_hidden_size: int
    """Dense MLP width (for MoE: the width of the first dense layers, if any)."""
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    kv_channels: int | None = None
    """Head dim when it is not hidden/heads (Gemma 2)."""
    vocab_size: int | None = field(default=None, compare=False)
    """The published vocabulary (parameter counts, HF export); training uses the tokenizer's."""
    max_position_embeddings: int = field(default=8192, compare=False)
    """Published context length (HF config)."""
    activation: str = "swiglu"
    """swiglu (silu gate, Shazeer 2020) or geglu (tanh-approximated gelu gate, Gemma)."""
    qkv_bias: bool = False
    """Biases on the q, k, v projections only (Qwen2)."""
    sandwich_norm: bool = False
    """RMSNorm also after attention and after the MLP, before the residual add (Gemma 2)."""
    norm_zero_centered: bool = False
    """RMSNorm scales by (1 + weight) (Gemma)."""
    embedding_scale: bool = False
    """Embeddings multiplied by sqrt(hidden_size) (Gemma)."""
    sliding_window: int | None = None
    """Attention sees at most this many tokens (itself included); None = full causal."""
    window_every: int = 1
    """1: every layer is windowed; 2: layers 0, 2, 4.. windowed, 1, 3, 5.. global (Gemma 2)."""
    attn_softcap: float | None = None
    """Attention logits -> c * tanh(logits / c) (Gemma 2: 50)."""
    final_softcap: float | None = None
    """Output logits -> c * tanh(logits / c) (Gemma 2: 30)."""
    query_pre_attn_scalar: float | None = None
    """Softmax scale is query_pre_attn_scalar^-0.5 instead of head_dim^-0.5 (Gemma 2)."""
    z_loss_coeff: float = 0.0
    """Output z-loss weight: + coeff * logsumexp(logits)^2 per token (PaLM, Chowdhery et al. 2022, sec. 5)."""
    rope: RopeScaling = field(default_factory=RopeScaling)
    moe: MoE | None = None
    mla: MLA | None = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def is_windowed(self, layer: int) -> bool:
        """Whether 0-based `layer` uses the sliding window."""
        return self.sliding_window is not None and layer % self.window_every == 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_dense_layers

    @classmethod
    def from_dict(cls, fields: dict) -> Arch:
        """The Arch whose `dataclasses.asdict` is `fields` (e.g. read back from a checkpoint's JSON)."""
        fields = dict(fields)
        for name, sub in (("rope", RopeScaling), ("moe", MoE), ("mla", MLA)):
            if isinstance(fields.get(name), dict):
                fields[name] = sub(**fields[name])
        return cls(**fields)

    def replace(self, **overrides: object) -> Arch:
        """A copy with fields replaced; `rope`/`moe`/`mla` accept dicts of their own fields."""
        for name, cls in (("rope", RopeScaling), ("moe", MoE), ("mla", MLA)):
            value = overrides.get(name)
            if isinstance(value, dict):
                base = getattr(self, name)
                names = {f.name for f in dataclasses.fields(cls)}
                bad = sorted(set(value) - names)
                if bad:
                    raise ConfigError(f"model.{name}.{bad[0]}", value[bad[0]], f"fields are {sorted(names)}")
                if base is None:
                    try:
                        overrides[name] = cls(**value)
                    except TypeError as e:
                        raise ConfigError(f"model.{name}", value, f"needs {e}") from None
                else:
                    overrides[name] = dataclasses.replace(base, **value)
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ConfigError(
                f"model.{bad[0]}", overrides[bad[0]], f"not a field of the architecture: {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)

    def validate(self, *, max_seq_length: int | None = None) -> Arch:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", getattr(self, key), "must be >= 1")
        if self.kv_channels is None and self.mla is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "model.num_attention_heads",
                self.num_attention_heads,
                f"must divide hidden_size={self.hidden_size} (or set kv_channels)",
            )
        if self.num_attention_heads % self.num_kv_heads:
            fits = [k for k in range(1, self.num_attention_heads + 1) if self.num_attention_heads % k == 0]
            raise ConfigError(
                "model.num_kv_heads",
                self.num_kv_heads,
                f"must divide num_attention_heads={self.num_attention_heads}; choose one of {fits}",
            )
        rope_dim = self.mla.qk_rope_head_dim if self.mla else self.head_dim
        if rope_dim % 2:
            raise ConfigError("model.hidden_size", self.hidden_size, f"the RoPE dim {rope_dim} must be even")
        if self.activation not in ACTIVATIONS:
            raise ConfigError("model.activation", self.activation, f"choose one of {', '.join(ACTIVATIONS)}")
        if self.rope.kind not in ROPE_KINDS:
            raise ConfigError("model.rope.kind", self.rope.kind, f"choose one of {', '.join(ROPE_KINDS)}")
        if self.rope.kind != "none" and self.rope.factor < 1:
            raise ConfigError("model.rope.factor", self.rope.factor, "must be >= 1 (the context extension)")
        if self.rope.kind == "llama3" and self.rope.high_freq_factor <= self.rope.low_freq_factor:
            raise ConfigError(
                "model.rope.high_freq_factor",
                self.rope.high_freq_factor,
                f"must exceed low_freq_factor={self.rope.low_freq_factor}",
            )
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise ConfigError("model.sliding_window", self.sliding_window, "must be >= 1 or null")
            if max_seq_length is not None and self.sliding_window > max_seq_length:
                raise ConfigError(
                    "model.sliding_window",
                    self.sliding_window,
                    f"must not exceed the context ({max_seq_length}); use null for full attention",
                )
        if self.window_every < 1:
            raise ConfigError("model.window_every", self.window_every, "must be >= 1")
        for key in ("attn_softcap", "final_softcap"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}", getattr(self, key), "must be > 0 or null")
        if self.moe is not None:
            m = self.moe
            if m.num_experts < 1:
                raise ConfigError("model.moe.num_experts", m.num_experts, "must be >= 1")
            if not 1 <= m.top_k <= m.num_experts:
                raise ConfigError("model.moe.top_k", m.top_k, f"must be in 1..num_experts={m.num_experts}")
            if not 0 <= m.first_dense_layers < self.num_layers:
                raise ConfigError(
                    "model.moe.first_dense_layers",
                    m.first_dense_layers,
                    f"must be in 0..{self.num_layers - 1}",
                )
            if m.score_function not in ("softmax", "sigmoid"):
                raise ConfigError("model.moe.score_function", m.score_function, "choose softmax or sigmoid")
            if m.expert_bias and m.score_function != "sigmoid":
                raise ConfigError(
                    "model.moe.expert_bias",
                    True,
                    "aux-loss-free balancing needs score_function=sigmoid (DeepSeek-V3)",
                )
            if m.capacity_factor is not None and m.capacity_factor <= 0:
                raise ConfigError(
                    "model.moe.capacity_factor", m.capacity_factor, "must be > 0 or null (dropless)"
                )
        if self.mla is not None:
            if self.mla.kv_lora_rank < 1:
                raise ConfigError("model.mla.kv_lora_rank", self.mla.kv_lora_rank, "must be >= 1")
            if self.num_kv_heads != self.num_attention_heads:
                raise ConfigError(
                    "model.num_kv_heads",
                    self.num_kv_heads,
                    f"MLA has one key/value per head: must equal num_attention_heads={self.num_attention_heads}",
                )
        return self


ATTENTION_BACKENDS = ("auto", "sdpa", "local", "te")


def attention_backend(name: str) -> str:
    """The core-attention backend `name` resolves to here: auto -> te when transformer_engine imports, else sdpa."""
    import importlib.util

    if name not in ATTENTION_BACKENDS:
        raise ConfigError("model.attention_backend", name, f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if name == "te" and not has_te:
        raise ConfigError(
            "model.attention_backend",
            name,
            "transformer_engine does not import here; install TransformerEngine, or use sdpa (or auto)",
        )
    if name == "auto":
        return "te" if has_te else "sdpa"
    return name
