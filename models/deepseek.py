"""DeepSeek-V2 (DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language
Model"): multi-head latent attention with decoupled RoPE (sec. 2.1), DeepSeekMoE with 2 shared and 64 fine-grained
routed experts, top-6 (sec. 2.2), the first layer dense, YaRN-extended RoPE. Figures from the HF config.json of
deepseek-ai/DeepSeek-V2-Lite."""

from __future__ import annotations

from models.arch import MLA, Arch, MoE, RopeScaling


def sizes() -> dict[str, Arch]:
    yarn = RopeScaling(
        kind="yarn",
        factor=40.0,
        original_context=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    )
    return {
        "tiny": Arch(
            4,
            256,
            8,
            8,
            704,
            rope_theta=10_000.0,
            norm_eps=1e-6,
            mla=MLA(
                kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32
            ),
            moe=MoE(
                num_experts=8, top_k=2, ffn_hidden_size=128, shared_ffn_hidden_size=256, first_dense_layers=1
            ),
        ),
        "V2-Lite": Arch(
            27,
            2048,
            16,
            16,
            10944,
            rope_theta=10_000.0,
            norm_eps=1e-6,
            vocab_size=102_400,
            max_position_embeddings=163_840,
            rope=yarn,
            mla=MLA(
                kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
            ),
            moe=MoE(
                num_experts=64,
                top_k=6,
                ffn_hidden_size=1408,
                shared_ffn_hidden_size=2 * 1408,
                first_dense_layers=1,
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
                aux_loss_coeff=0.001,
            ),
        ),
    }
