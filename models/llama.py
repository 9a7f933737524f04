"""Llama-3-style decoder (Dubey et al. 2024): pre-norm RMSNorm, RoPE, SwiGLU MLP, grouped-query attention,
no biases. Built as a megatron-core `GPTModel` with the local layer spec (no TransformerEngine needed).

Sizes are code (CONVENTIONS 6): `SIZES` holds each size; YAML names one and overrides single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.errors import ConfigError


@dataclass(frozen=True)
class LlamaArch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def llama_ffn_size(hidden: int, *, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """SwiGLU width as in Llama: 2/3 of 4h (same FLOPs as a 4h GELU MLP), times a multiplier,
    rounded up to a multiple (Llama 3 8B: h=4096, x1.3, multiple 1024 -> 14336)."""
    width = int(multiplier * int(2 * 4 * hidden / 3))
    return multiple_of * -(-width // multiple_of)


SIZES: dict[str, dict[str, LlamaArch]] = {
    "llama3": {
        # A few M parameters: the CPU main job and the tests.
        "tiny": LlamaArch(4, 256, 8, 2, llama_ffn_size(256, multiple_of=64), rope_theta=10_000.0),
        # Dubey et al. 2024, Table 3.
        "8B": LlamaArch(32, 4096, 32, 8, llama_ffn_size(4096, multiplier=1.3, multiple_of=1024)),
        "70B": LlamaArch(80, 8192, 64, 8, llama_ffn_size(8192, multiplier=1.3, multiple_of=4096)),
        "405B": LlamaArch(126, 16384, 128, 8, llama_ffn_size(16384, multiplier=1.2, multiple_of=4096)),
    }
}


def resolve_arch(family: str, size: str, **overrides: object) -> LlamaArch:
    if family not in SIZES:
        raise ConfigError("model.family", family, f"choose one of {', '.join(SIZES)}")
    if size not in SIZES[family]:
        raise ConfigError("model.size", size, f"choose one of {', '.join(SIZES[family])}")
    arch = dataclasses.replace(SIZES[family][size], **overrides)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size"):
        if getattr(arch, key) < 1:
            raise ConfigError(f"model.{key}", getattr(arch, key), "must be >= 1")
    if arch.hidden_size % arch.num_attention_heads:
        raise ConfigError(
            "model.num_attention_heads",
            arch.num_attention_heads,
            f"must divide hidden_size={arch.hidden_size}",
        )
    if arch.num_attention_heads % arch.num_kv_heads:
        fits = [k for k in range(1, arch.num_attention_heads + 1) if arch.num_attention_heads % k == 0]
        raise ConfigError(
            "model.num_kv_heads",
            arch.num_kv_heads,
            f"must divide num_attention_heads={arch.num_attention_heads}; choose one of {fits}",
        )
    if arch.head_dim % 2:
        raise ConfigError(
            "model.hidden_size", arch.hidden_size, "head_dim (hidden/heads) must be even for RoPE"
        )
    return arch


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the embedding so every tensor-parallel shard has the same, aligned size."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def transformer_config(arch: LlamaArch, *, tp: int = 1, sp: bool = False, dtype: torch.dtype = torch.float32):
    """The megatron-core TransformerConfig of a Llama architecture (fusions off: they need CUDA/Apex)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(x W1) * (x W3)
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,  # the same weights whatever tp is (and no CUDA needed)
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_model(
    arch: LlamaArch,
    *,
    vocab_size: int,
    max_seq_length: int,
    tp: int = 1,
    sp: bool = False,
    rope_scaling_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
):
    """A megatron-core GPTModel for `arch`. `rope_scaling_factor` > 1 is linear position interpolation
    (positions / factor, Chen et al. 2023); it changes no weights, so a checkpoint loads either way."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(arch, tp=tp, sp=sp, dtype=dtype)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, tp),
        max_sequence_length=max_seq_length,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        seq_len_interpolation_factor=rope_scaling_factor if rope_scaling_factor != 1.0 else None,
        share_embeddings_and_output_weights=arch.tie_embeddings,
    )
