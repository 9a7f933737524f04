"""Conversion both ways with Hugging Face checkpoints (safetensors + config.json), one mapping table per family.

- `load_hf_into(model, folder)`: a HF checkpoint as the start of continued pre-training (this rank's TP/EP shard).
- `save_hf(state, arch, folder, family=..., vocab_size=...)`: export a full state dict (`full_state_dict(model)`
  gathers it from TP/EP shards) as a checkpoint `transformers` loads with `AutoModelForCausalLM.from_pretrained`.

A table row is (kiln key, HF key) for a plain copy, or (kiln key, ("qkv", q, k, v)) for megatron's fused QKV
(per KV group: the group's query heads, then its key, then its value), or (kiln key, ("glu", gate, up)) for the
fused gated-MLP input ([gate; up]). `{e}` in a key stands for an expert index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from models.arch import MLA, Arch, MoE, RopeScaling
from train.errors import ConfigError

Row = tuple[str, "str | tuple[str, ...]"]

# ------------------------------------------------------------------------------------------------ tables
_ATTENTION: list[Row] = [
    (
        "self_attention.linear_qkv.weight",
        ("qkv", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
]
_QKV_BIAS: list[Row] = [
    (
        "self_attention.linear_qkv.bias",
        ("qkv", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
]
_MLP: list[Row] = [
    ("mlp.linear_fc1.weight", ("glu", "mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
]

# Llama 3, Mistral, Qwen2 (HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM).
LLAMA: list[Row] = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    *_ATTENTION,
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    *_MLP,
]
# Gemma 2: HF's post_attention_layernorm is the norm AFTER attention (our linear_proj.post_norm).
GEMMA2: list[Row] = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    *_ATTENTION,
    ("self_attention.linear_proj.post_norm.weight", "post_attention_layernorm.weight"),
    ("pre_mlp_layernorm.weight", "pre_feedforward_layernorm.weight"),
    *_MLP,
    ("mlp.linear_fc2.post_norm.weight", "post_feedforward_layernorm.weight"),
]
# Mixtral: w1 = gate, w3 = up, w2 = down (hub layout; transformers 5 fuses the experts on load).
MIXTRAL: list[Row] = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    *_ATTENTION,
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.router.weight", "block_sparse_moe.gate.weight"),
    (
        "mlp.experts.local_experts.{e}.linear_fc1.weight",
        ("glu", "block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
    ),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "block_sparse_moe.experts.{e}.w2.weight"),
]
# DeepSeek-V2: MLA; the kv down-projection holds [latent; rope key] in both (same row order).
_MLA_Q_PLAIN: list[Row] = [("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight")]
_MLA_Q_LORA: list[Row] = [
    ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
    ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
    ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
]
_MLA_KV: list[Row] = [
    ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
    ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
]
_DEEPSEEK_MOE: list[Row] = [
    ("mlp.router.weight", "mlp.gate.weight"),
    (
        "mlp.experts.local_experts.{e}.linear_fc1.weight",
        ("glu", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    ),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj.weight"),
]
_DEEPSEEK_SHARED: list[Row] = [
    (
        "mlp.shared_experts.linear_fc1.weight",
        ("glu", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    ),
    ("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight"),
]

HF_ARCHITECTURES = {
    "llama3": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2"),
}
_FAMILY_OF_MODEL_TYPE = {model_type: family for family, (_, model_type) in HF_ARCHITECTURES.items()}


def layer_table(arch: Arch, layer: int) -> list[Row]:
    """The mapping of one decoder layer (kiln key under `decoder.layers.{i}.`, HF key under `model.layers.{i}.`)."""
    if arch.mla is not None:
        rows = [("input_layernorm.weight", "input_layernorm.weight")]
        rows += _MLA_Q_PLAIN if arch.mla.q_lora_rank is None else _MLA_Q_LORA
        rows += [*_MLA_KV, ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight")]
        if not arch.is_moe_layer(layer):
            return rows + _MLP
        return rows + _DEEPSEEK_MOE + (_DEEPSEEK_SHARED if arch.moe.shared_ffn_hidden_size else [])
    if arch.moe is not None:
        return MIXTRAL
    rows = GEMMA2 if arch.sandwich_norm else LLAMA
    return rows[:2] + _QKV_BIAS + rows[2:] if arch.qkv_bias else rows


def table(arch: Arch) -> list[Row]:
    """Every (kiln key, HF key) of the model, experts expanded."""
    rows: list[Row] = [("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(arch.num_layers):
        for ours, theirs in layer_table(arch, i):
            experts = range(arch.moe.num_experts) if "{e}" in ours else [None]
            for e in experts:

                def fill(key: str, e=e, i=i, prefix: str = "") -> str:
                    return prefix + (key.format(e=e) if e is not None else key)

                hf = (
                    fill(theirs, prefix=f"model.layers.{i}.")
                    if isinstance(theirs, str)
                    else (theirs[0], *(fill(k, prefix=f"model.layers.{i}.") for k in theirs[1:]))
                )
                rows.append((fill(ours, prefix=f"decoder.layers.{i}."), hf))
    rows.append(("decoder.final_layernorm.weight", "model.norm.weight"))
    if not arch.tie_embeddings:
        rows.append(("output_layer.weight", "lm_head.weight"))
    return rows


# ------------------------------------------------------------------------------------------ conversion
def _split_qkv(fused: torch.Tensor, arch: Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_attention_heads // groups
    t = fused.reshape(groups, (per + 2) * d, *fused.shape[1:])  # (groups, [q heads, k, v] * head_dim, ...)
    q, k, v = t.split([per * d, d, d], dim=1)
    return (q.reshape(-1, *fused.shape[1:]), k.reshape(-1, *fused.shape[1:]), v.reshape(-1, *fused.shape[1:]))


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Arch) -> torch.Tensor:
    groups, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_attention_heads // groups
    rest = q.shape[1:]
    parts = (q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def to_hf_state(state: dict[str, torch.Tensor], arch: Arch, *, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our full (unsharded) state dict -> HF tensors (embedding and LM head cut to `vocab_size` rows)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in table(arch):
        if ours not in state:
            raise ConfigError("state_dict", ours, "missing from the model's state dict (wrong architecture?)")
        t = state[ours].detach()
        if ours in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:vocab_size]
        if isinstance(theirs, str):
            out[theirs] = t.clone().contiguous()
        elif theirs[0] == "qkv":
            for key, part in zip(theirs[1:], _split_qkv(t, arch), strict=True):
                out[key] = part.clone().contiguous()
        else:  # glu: [gate; up]
            gate, up = t.chunk(2, dim=0)
            out[theirs[1]], out[theirs[2]] = gate.clone().contiguous(), up.clone().contiguous()
    return out


def from_hf_state(hf: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """HF tensors -> our full state dict (vocabulary rows as in the checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in table(arch):
        keys = [theirs] if isinstance(theirs, str) else list(theirs[1:])
        missing = [k for k in keys if k not in hf]
        if missing:
            raise ConfigError(
                "hf checkpoint",
                missing[0],
                f"missing: the checkpoint does not hold this architecture ({ours})",
            )
        if isinstance(theirs, str):
            out[ours] = hf[theirs]
        elif theirs[0] == "qkv":
            out[ours] = _fuse_qkv(*(hf[k] for k in keys), arch)
        else:
            out[ours] = torch.cat([hf[k] for k in keys], dim=0)
    return out


# ---------------------------------------------------------------------------------------------- config
def _rope_to_hf(r: RopeScaling) -> dict | None:
    if r.kind == "none":
        return None
    if r.kind == "linear":
        return {"rope_type": "linear", "factor": r.factor}
    if r.kind == "dynamic":
        return {
            "rope_type": "dynamic",
            "factor": r.factor,
            "original_max_position_embeddings": r.original_context,
        }
    if r.kind == "llama3":
        return {
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_context,
        }
    out = {
        "rope_type": "yarn",
        "factor": r.factor,
        "original_max_position_embeddings": r.original_context,
        "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow,
    }
    if r.mscale_all_dim:
        out.update(mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
    return out


def _rope_from_hf(cfg: dict) -> tuple[float, RopeScaling]:
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, RopeScaling()
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ConfigError(
            "config.json rope_scaling.rope_type", kind, "supported: linear, dynamic, yarn, llama3"
        )
    fields = dict(kind=kind, factor=float(params.get("factor", 1.0)))
    if kind == "dynamic":  # HF's dynamic NTK grows the base past max_position_embeddings
        fields["original_context"] = int(cfg.get("max_position_embeddings", 8192))
    elif "original_max_position_embeddings" in params:
        fields["original_context"] = int(params["original_max_position_embeddings"])
    elif kind == "yarn":
        fields["original_context"] = int(cfg.get("max_position_embeddings", 8192))
    for ours, theirs in (
        ("low_freq_factor",) * 2,
        ("high_freq_factor",) * 2,
        ("beta_fast",) * 2,
        ("beta_slow",) * 2,
    ):
        if theirs in params:
            fields[ours] = float(params[theirs])
    if kind == "yarn" and params.get("mscale") and params.get("mscale_all_dim"):
        fields.update(mscale=float(params["mscale"]), mscale_all_dim=float(params["mscale_all_dim"]))
    return theta, RopeScaling(**fields)


def check_exportable(arch: Arch, family: str) -> None:
    """Raise ConfigError naming the first feature of `arch` that the family's `transformers` model does not compute
    (its outputs would differ from Kiln's), e.g. DeepseekV2's router never renormalizes the top-k weights."""
    gemma = family == "gemma2"
    moe = arch.moe
    rows = [
        ("qkv_bias", arch.qkv_bias, arch.qkv_bias and family != "qwen2"),
        ("activation", arch.activation, (arch.activation == "geglu") != gemma),
        ("sandwich_norm", arch.sandwich_norm, arch.sandwich_norm != gemma),
        ("norm_zero_centered", arch.norm_zero_centered, arch.norm_zero_centered != gemma),
        ("embedding_scale", arch.embedding_scale, arch.embedding_scale != gemma),
        ("attn_softcap", arch.attn_softcap, arch.attn_softcap is not None and not gemma),
        ("final_softcap", arch.final_softcap, arch.final_softcap is not None and not gemma),
        (
            "sliding_window",
            arch.sliding_window,
            arch.sliding_window is not None and family in ("llama3", "deepseek_v2"),
        ),
        ("window_every", arch.window_every, arch.window_every != (2 if gemma else 1) and arch.sliding_window),
        ("moe", moe, moe is not None and family not in ("mixtral", "deepseek_v2")),
        ("mla", arch.mla, arch.mla is not None and family != "deepseek_v2"),
    ]
    if moe is not None:
        rows += [
            ("moe.score_function", moe.score_function, moe.score_function != "softmax"),
            ("moe.expert_bias", moe.expert_bias, moe.expert_bias),
            ("moe.capacity_factor", moe.capacity_factor, moe.capacity_factor is not None),
            # Mixtral always renormalizes the top-k weights, DeepseekV2 never does.
            ("moe.norm_topk_prob", moe.norm_topk_prob, moe.norm_topk_prob != (family == "mixtral")),
        ]
    for key, value, bad in rows:
        if bad:
            name = HF_ARCHITECTURES[family][0]
            raise ConfigError(
                f"model.{key}",
                value,
                f"transformers' {name} does not compute this (it would give other outputs than the Kiln "
                f"{family} model); export it with --format torch, or train with the setting transformers has",
            )


def hf_config(arch: Arch, *, family: str, vocab_size: int) -> dict:
    """The config.json of `arch` for `transformers`."""
    if family not in HF_ARCHITECTURES:
        raise ConfigError("family", family, f"choose one of {', '.join(HF_ARCHITECTURES)}")
    name, model_type = HF_ARCHITECTURES[family]
    cfg = {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        # HF's dynamic NTK takes the original context from max_position_embeddings.
        "max_position_embeddings": arch.rope.original_context
        if arch.rope.kind == "dynamic"
        else arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": _rope_to_hf(arch.rope),
        "tie_word_embeddings": arch.tie_embeddings,
        "hidden_act": "silu" if arch.activation == "swiglu" else "gelu_pytorch_tanh",
        "attention_bias": False,
        "initializer_range": arch.init_std,
        "torch_dtype": "float32",
    }
    if family in ("mistral", "mixtral", "qwen2"):
        cfg["sliding_window"] = arch.sliding_window
        if family == "qwen2":
            cfg["use_sliding_window"] = arch.sliding_window is not None
            cfg["max_window_layers"] = arch.num_layers
    if family == "gemma2":
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=int(arch.query_pre_attn_scalar or arch.head_dim),
            sliding_window=arch.sliding_window,
            attn_logit_softcapping=arch.attn_softcap,
            final_logit_softcapping=arch.final_softcap,
            layer_types=[
                "sliding_attention" if arch.is_windowed(i) else "full_attention"
                for i in range(arch.num_layers)
            ],
        )
    if arch.moe is not None and family == "mixtral":
        cfg.update(
            num_local_experts=arch.moe.num_experts,
            num_experts_per_tok=arch.moe.top_k,
            intermediate_size=arch.moe.ffn_hidden_size,
            router_aux_loss_coef=arch.moe.aux_loss_coeff,
        )
    if family == "deepseek_v2":
        m, e = arch.mla, arch.moe
        cfg.update(
            kv_lora_rank=m.kv_lora_rank,
            q_lora_rank=m.q_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim,
            qk_rope_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim,
            head_dim=m.qk_rope_head_dim,
            n_routed_experts=e.num_experts,
            num_experts_per_tok=e.top_k,
            moe_intermediate_size=e.ffn_hidden_size,
            n_shared_experts=e.shared_ffn_hidden_size // e.ffn_hidden_size,
            first_k_dense_replace=e.first_dense_layers,
            norm_topk_prob=e.norm_topk_prob,
            routed_scaling_factor=e.routed_scaling_factor,
            topk_method="greedy",
            scoring_func=e.score_function,
            aux_loss_alpha=e.aux_loss_coeff,
        )
    return cfg


def arch_from_hf(cfg: dict) -> tuple[str, Arch]:
    """(family, Arch) of a HF config.json."""
    model_type = cfg.get("model_type")
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ConfigError(
            "config.json model_type", model_type, f"supported: {', '.join(_FAMILY_OF_MODEL_TYPE)}"
        )
    family = _FAMILY_OF_MODEL_TYPE[model_type]
    theta, rope = _rope_from_hf(cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kw = dict(
        rope_theta=theta,
        rope=rope,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        kv_channels=head_dim if head_dim != cfg["hidden_size"] // heads else None,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        init_std=cfg.get("initializer_range", 0.02),
    )
    ffn = cfg["intermediate_size"]
    if family in ("mistral", "mixtral") or (family == "qwen2" and cfg.get("use_sliding_window")):
        kw["sliding_window"] = cfg.get("sliding_window")
    if family == "qwen2":
        kw["qkv_bias"] = True
    if family == "gemma2":
        types = cfg.get("layer_types") or ["sliding_attention", "full_attention"]
        kw.update(
            activation="geglu",
            sandwich_norm=True,
            norm_zero_centered=True,
            embedding_scale=True,
            sliding_window=cfg.get("sliding_window"),
            window_every=2 if "full_attention" in types else 1,
            attn_softcap=cfg.get("attn_logit_softcapping"),
            final_softcap=cfg.get("final_logit_softcapping"),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", head_dim)),
        )
    if family == "mixtral":
        kw["moe"] = MoE(
            num_experts=cfg["num_local_experts"],
            top_k=cfg["num_experts_per_tok"],
            ffn_hidden_size=ffn,
            aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0)),
        )
    if family == "deepseek_v2":
        kw["kv_channels"] = None
        kw["mla"] = MLA(
            kv_lora_rank=cfg["kv_lora_rank"],
            q_lora_rank=cfg.get("q_lora_rank"),
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
        )
        kw["moe"] = MoE(
            num_experts=cfg["n_routed_experts"],
            top_k=cfg["num_experts_per_tok"],
            ffn_hidden_size=cfg["moe_intermediate_size"],
            shared_ffn_hidden_size=cfg.get("n_shared_experts", 0) * cfg["moe_intermediate_size"],
            first_dense_layers=cfg.get("first_k_dense_replace", 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            aux_loss_coeff=float(cfg.get("aux_loss_alpha", 0.0)),
        )
    arch = Arch(
        cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg.get("num_key_value_heads", heads), ffn, **kw
    )
    return family, arch.validate()


# ------------------------------------------------------------------------------------------ files
def read_hf_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def save_hf(
    state: dict[str, torch.Tensor],
    arch: Arch,
    folder: str | Path,
    *,
    family: str,
    vocab_size: int,
    max_shard_bytes: int | None = None,
    config_extra: dict | None = None,
) -> Path:
    """Write `state` (our full state dict) as safetensors + config.json in `folder`: one model.safetensors, or,
    when the tensors exceed `max_shard_bytes`, HF's sharded layout (model-00001-of-0000N.safetensors, ... and
    model.safetensors.index.json mapping each tensor to its file). `config_extra` adds to config.json (token ids)."""
    from safetensors.torch import save_file

    check_exportable(arch, family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state(state, arch, vocab_size=vocab_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in hf.items():  # in table order: a layer's tensors stay together
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for t in hf.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config(arch, family=family, vocab_size=vocab_size) | (config_extra or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


_COMPARED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "head_dim",
    "tie_embeddings",
    "qkv_bias",
    "sandwich_norm",
    "activation",
    "moe",
    "mla",
)


def check_matches(model_arch: Arch, hf_arch: Arch) -> None:
    """Raise ConfigError naming the first architecture field where the checkpoint differs from the model."""
    for name in _COMPARED:
        ours, theirs = getattr(model_arch, name), getattr(hf_arch, name)
        if name == "moe" and ours is not None and theirs is not None:
            for f in (
                "num_experts",
                "top_k",
                "ffn_hidden_size",
                "shared_ffn_hidden_size",
                "first_dense_layers",
            ):
                if getattr(ours, f) != getattr(theirs, f):
                    raise ConfigError(
                        f"model.moe.{f}", getattr(ours, f), f"the HF checkpoint has {getattr(theirs, f)}"
                    )
            continue
        if ours != theirs:
            raise ConfigError(f"model.{name}", ours, f"the HF checkpoint has {theirs}")


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face checkpoint folder: config.json next to model.safetensors (or its sharded index)."""
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def _chunk_key(model, key: str, layers: dict[int, int]) -> str | None:
    """The key of global `key` in this pipeline chunk (layers renumbered from 0), or None if another chunk
    holds it. megatron-core numbers each chunk's layers locally; `layer_number` is the global 1-based index."""
    m = _LAYER.match(key)
    if m is None:
        return key
    local = layers.get(int(m.group(1)))
    return None if local is None else f"decoder.layers.{local}.{m.group(2)}"


def load_hf_into(model, folder: str | Path) -> dict[str, int]:
    """Load a HF checkpoint into `model` (a `KilnGPTModel`, possibly one TP/EP shard or one pipeline chunk):
    checks config.json against model.arch, converts, slices this rank's piece; every parameter of the model
    must be covered. Returns {"loaded": tensors, "vocab_rows": rows copied}."""
    from models.shard import local_key, shard_for_rank

    folder = Path(folder)
    _, hf_arch = arch_from_hf(json.loads((folder / "config.json").read_text()))
    check_matches(model.arch, hf_arch)
    full = from_hf_state(read_hf_state(folder), model.arch)
    own = model.state_dict()
    params = dict(model.named_parameters())
    layers = {layer.layer_number - 1: i for i, layer in enumerate(model.decoder.layers)}
    embedding = "embedding.word_embeddings.weight"
    if embedding in full and "output_layer.weight" not in full and embedding not in params:
        # Tied embeddings at PP > 1: the last chunk holds its own copy of the embedding as the output layer.
        full["output_layer.weight"] = full[embedding]
    loaded: set[str] = set()
    vocab_rows = 0
    with torch.no_grad():
        for key, value in full.items():
            chunk_key = _chunk_key(model, key, layers)
            if chunk_key is None or (chunk_key not in own and not _LAYER.match(chunk_key)):
                continue  # another pipeline chunk's layer, or its embedding / final norm / output layer
            local = shard_for_rank(model, chunk_key, value)
            if local is None:
                continue
            name = local_key(model, chunk_key)
            target = own[name]
            loaded.add(name)
            if key in (embedding, "output_layer.weight"):
                vocab_rows = local.shape[0]
                if vocab_rows > target.shape[0]:
                    raise ConfigError(
                        f"hf checkpoint {key}",
                        tuple(value.shape),
                        f"its {vocab_rows} vocabulary rows do not fit the model's {target.shape[0]}: "
                        "train on the checkpoint's own tokenizer (data.tokenizer.model_path)",
                    )
                target.zero_()
                target[: local.shape[0]].copy_(local)
                continue
            if target.shape != local.shape:
                raise ConfigError(
                    f"hf checkpoint {key}", tuple(local.shape), f"the model expects {tuple(target.shape)}"
                )
            target.copy_(local)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(
            "hf checkpoint", str(folder), f"has no weights for {missing[:3]} ({len(missing)} parameters)"
        )
    return {"loaded": len(loaded), "vocab_rows": vocab_rows}
