"""From an `Arch` to megatron-core: its TransformerConfig and one layer spec per layer (CONVENTIONS 2: the model
reads as the paper's architecture; which megatron module plays each part is decided here, in one place).

megatron-core modules wherever they cover the feature (local spec, no TransformerEngine): SelfAttention with
ColumnParallel QKV (+ bias for Qwen2) and RowParallel output, MLASelfAttention (DeepSeek-V2), MLP with gated
linear units, MoELayer (TopKRouter, SequentialMLP experts, SharedExpertMLP), DotProductAttention (full or sliding
window). Plain torch (models/blocks.py) where it does not: RMSNorm with (1 + w), the post-norms of the sandwich,
core attention with soft-capping or MLA's distinct key/value head dims.

Core attention has a backend (`model.attention_backend`, `models.arch.attention_backend()`): `sdpa` (models/blocks.py
CoreAttention through torch's scaled_dot_product_attention, every layer), `local` (megatron-core's unfused
DotProductAttention where it covers the layer, the plain-torch math elsewhere: the reference path), `te`
(TransformerEngine's fused TEDotProductAttention where it covers the layer, sdpa elsewhere), `auto` (te when
transformer_engine imports, else sdpa). Only the core attention changes: parameters and checkpoints are the same.
The gated MLP activation runs through megatron's fused SwiGLU/GeGLU when `fused_activation` (model.fusion.activation,
models/fusions.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from models.arch import Arch
from models.blocks import CoreAttention, PostNormRowParallelLinear, RMSNorm
from models.rope import attention_scale

# These fusions need CUDA/Apex/TE; numerics stay those of the reference implementations. bias_activation_fusion
# follows model.fusion.activation (models/fusions.py), set in transformer_config.
_FUSIONS_OFF = dict(
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GeGLU gate as in Gemma (HF "gelu_pytorch_tanh")


def _activation(arch: Arch, *, fused: bool):
    """The GLU gate. megatron fuses F.silu and F.gelu only, and its fused "gelu" GLU is the tanh form
    (fused_bias_geglu.py): F.gelu selects it. Unfused, F.gelu would be the erf form, so _gelu_tanh stays there."""
    if arch.activation == "swiglu":
        return F.silu
    return F.gelu if fused else _gelu_tanh


def softmax_scale(arch: Arch) -> float:
    """1/sqrt(d) (Vaswani et al. 2017), with Gemma 2's query_pre_attn_scalar and YaRN's temperature."""
    base = (arch.query_pre_attn_scalar or arch.head_dim) ** -0.5
    return base * attention_scale(arch.rope)


def _moe_kwargs(arch: Arch, *, ep: int, etp: int) -> dict:
    m = arch.moe
    if m is None:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.top_k,
        moe_ffn_hidden_size=m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.shared_ffn_hidden_size or None,
        # Mixtral renormalizes the top-k probabilities: softmax over the k chosen logits (== pre-softmax + renorm);
        # DeepSeek-V2 keeps softmax-over-all probabilities (pre-softmax, no renorm).
        moe_router_pre_softmax=not m.norm_topk_prob or m.top_k == 1,
        moe_router_score_function=m.score_function,
        moe_router_topk_scaling_factor=m.routed_scaling_factor if m.routed_scaling_factor != 1.0 else None,
        moe_router_load_balancing_type="aux_loss" if m.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.aux_loss_coeff,
        moe_z_loss_coeff=m.z_loss_coeff or None,
        moe_router_enable_expert_bias=m.expert_bias,
        moe_router_bias_update_rate=m.bias_update_rate,
        moe_expert_capacity_factor=m.capacity_factor,
        # allgather: exact on gloo without a shim (ENGINES-CPU.md); alltoall (faster at large EP) needs the CPU
        # `moe_splits` shim, and capacity dropping needs alltoall.
        moe_token_dispatcher_type="alltoall" if m.capacity_factor is not None else "allgather",
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",
        moe_layer_freq=[int(arch.is_moe_layer(i)) for i in range(arch.num_layers)],
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def _mla_kwargs(arch: Arch) -> dict:
    if arch.mla is None:
        return {}
    m, r = arch.mla, arch.rope
    kw = dict(
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_nope_head_dim,
        qk_pos_emb_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        rotary_base=arch.rope_theta,
        rope_type="yarn" if r.kind == "yarn" else "rope",
    )
    if r.kind == "yarn":
        kw.update(
            rotary_scaling_factor=r.factor,
            original_max_position_embeddings=r.original_context,
            beta_fast=r.beta_fast,
            beta_slow=r.beta_slow,
            mscale=r.mscale,
            mscale_all_dim=r.mscale_all_dim,
        )
    else:
        kw.update(rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    return kw


def transformer_config(
    arch: Arch,
    *,
    tp: int = 1,
    sp: bool = False,
    ep: int = 1,
    etp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: torch.dtype = torch.float32,
    fused_activation: bool = False,
):
    """The megatron-core TransformerConfig (MLATransformerConfig for MLA) of `arch` at this layout.
    `fused_activation`: megatron's fused SwiGLU/GeGLU (models/fusions.py)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if arch.mla is not None and arch.rope.kind not in ("none", "yarn"):
        from train.errors import ConfigError

        raise ConfigError("model.rope.kind", arch.rope.kind, "MLA (megatron-core) supports none or yarn")
    cls = MLATransformerConfig if arch.mla is not None else TransformerConfig
    # megatron's experts weight the activation by the router probability inside the fused kernel, which exists
    # for SwiGLU only ("Only support fusion of swiglu and quick_gelu with per_token_scale"): GeGLU MoE stays plain.
    fused_activation = fused_activation and not (arch.moe is not None and arch.activation == "geglu")
    window = None
    if arch.sliding_window is not None and arch.window_every == 1:
        window = (arch.sliding_window - 1, 0)  # megatron keeps [i - left, i]: `sliding_window` tokens
    return cls(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        layernorm_zero_centered_gamma=arch.norm_zero_centered,
        gated_linear_unit=True,  # SwiGLU / GeGLU: act(x W_gate) * (x W_up)  (Shazeer 2020)
        activation_func=_activation(arch, fused=fused_activation),
        bias_activation_fusion=fused_activation,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        softmax_scale=None if arch.mla is not None else softmax_scale(arch),
        window_size=window,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,  # required with pp > 1: the dtype of activations sent between stages
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,  # the same weights whatever the layout (and no CUDA needed)
        **_FUSIONS_OFF,
        **_moe_kwargs(arch, ep=ep, etp=etp),
        **_mla_kwargs(arch),
    )


def _core_attention(arch: Arch, layer: int, backend: str, cp: int = 1):
    """megatron's SelfAttention calls its core_attention directly (a class or partial); MLASelfAttention goes
    through build_module (a class or ModuleSpec). Context parallelism (cp > 1) without TE: CoreAttention's
    all-gather K/V path (parallel/context.py); megatron's DotProductAttention asserts cp == 1."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    # megatron-core's attention covers the layer: no soft-capping, and a window (if any) on every layer (the
    # config carries it); MLA's distinct key/value head dims only in TE's.
    covered = arch.attn_softcap is None and (arch.sliding_window is None or arch.window_every == 1)
    if backend == "local" and covered and arch.mla is None and cp == 1:
        return DotProductAttention
    if backend == "te" and covered:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    params = dict(
        window=arch.sliding_window if arch.is_windowed(layer) else None,
        softcap=arch.attn_softcap,
        sdpa=backend != "local",
    )
    if arch.mla is not None:
        return ModuleSpec(module=CoreAttention, params=params)
    return functools.partial(CoreAttention, **params)


def _mlp_spec(arch: Arch, layer: int):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if arch.is_moe_layer(layer):
        return get_moe_module_spec(use_te=False, num_experts=arch.moe.num_experts, moe_grouped_gemm=False)
    fc2 = PostNormRowParallelLinear if arch.sandwich_norm else RowParallelLinear
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=fc2))


def _attention_spec(arch: Arch, layer: int, backend: str, cp: int = 1):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    proj = PostNormRowParallelLinear if arch.sandwich_norm else RowParallelLinear
    core = _core_attention(arch, layer, backend, cp)
    if arch.mla is not None:
        return ModuleSpec(
            module=MLASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=MLASelfAttentionSubmodules(
                linear_q_proj=ColumnParallelLinear,
                linear_q_down_proj=ColumnParallelLinear,
                linear_q_up_proj=ColumnParallelLinear,
                linear_kv_down_proj=ColumnParallelLinear,
                linear_kv_up_proj=ColumnParallelLinear,
                core_attention=core,
                linear_proj=proj,
                q_layernorm=RMSNorm if arch.mla.q_lora_rank is not None else IdentityOp,
                kv_layernorm=RMSNorm,
            ),
        )
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core,
            linear_proj=proj,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def layer_spec(arch: Arch, layer: int, *, backend: str = "sdpa", cp: int = 1):
    """The megatron-core TransformerLayer spec of 0-based `layer`: pre-norm attention and MLP with residuals."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=_attention_spec(arch, layer, backend, cp),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=_mlp_spec(arch, layer),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(arch: Arch, config, *, vp_stage: int | None = None, backend: str = "sdpa"):
    """The layers this pipeline stage builds (all of them without PP), and the final norm; `backend` is a
    resolved attention backend (sdpa, local or te)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[
            layer_spec(arch, i, backend=backend, cp=config.context_parallel_size)
            for i in range(offset, offset + count)
        ],
        layer_norm=RMSNorm,
    )
