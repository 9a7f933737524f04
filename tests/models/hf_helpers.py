"""Shared by the HF parity tests: a small random architecture per family and its `transformers` twin."""

from __future__ import annotations

import torch

from models.arch import MLA, MoE, RopeScaling
from models.hf import hf_config
from models.registry import resolve_arch

VOCAB = 256  # a multiple of 128: megatron pads nothing, so softmax runs over the same vocabulary as HF's
SEQ = 40  # longer than every test window

_SMALL = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96)

CASES = {
    "llama3": ("llama3", "debug", dict(_SMALL, rope_theta=500_000.0)),
    "mistral": ("mistral", "tiny", dict(_SMALL, sliding_window=16)),
    "mixtral": (
        "mixtral",
        "tiny",
        dict(
            _SMALL,
            ffn_hidden_size=48,
            moe=MoE(num_experts=4, top_k=2, ffn_hidden_size=48, aux_loss_coeff=0.0),
        ),
    ),
    "qwen2": ("qwen2", "tiny", dict(_SMALL, tie_embeddings=True)),
    "gemma2": ("gemma2", "tiny", dict(_SMALL, kv_channels=24, sliding_window=16, query_pre_attn_scalar=24.0)),
    "deepseek_v2": (
        "deepseek_v2",
        "tiny",
        dict(
            _SMALL,
            num_kv_heads=4,
            mla=MLA(
                kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
            ),
            moe=MoE(
                num_experts=4,
                top_k=2,
                ffn_hidden_size=32,
                shared_ffn_hidden_size=64,
                first_dense_layers=1,
                norm_topk_prob=False,
            ),
        ),
    ),
}

ROPES = {
    "linear": RopeScaling(kind="linear", factor=4.0),
    "dynamic": RopeScaling(kind="dynamic", factor=4.0, original_context=16),
    "yarn": RopeScaling(kind="yarn", factor=4.0, original_context=16),
    "llama3": RopeScaling(
        kind="llama3", factor=8.0, original_context=32, low_freq_factor=1.0, high_freq_factor=4.0
    ),
}


def arch_of(case: str, **extra):
    family, size, overrides = CASES[case]
    return family, resolve_arch(family, size, **{**overrides, **extra})


def hf_model(arch, family: str, *, seed: int = 0):
    """The `transformers` model of `arch`, eager attention, weights drawn so that logits are far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = hf_config(arch, family=family, vocab_size=VOCAB)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                base = 0.0 if arch.norm_zero_centered else 1.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def kiln_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None).float()
