"""Parameter counts of MoE/MLA architectures against published models, FLOPs conventions, the device table."""

from __future__ import annotations

import pytest

from models.registry import sizes
from parallel.plan.flops import PlanArch, as_plan_arch, flops_per_token, param_count
from parallel.plan.hardware import DEVICES, budget_from_gpu_hours, peak_flops
from train.errors import ConfigError

# Mixtral 8x7B (Jiang et al. 2024; HF config): 32 layers, d 4096, 32 heads / 8 KV, 8 experts of 14336, top-2.
MIXTRAL_8X7B = PlanArch(32, 4096, 32, 8, 14336, num_experts=8, top_k=2)
# DeepSeek-V2-Lite (DeepSeek-AI 2024, HF config): MLA (kv rank 512, no q compression), 64 routed + 2 shared
# experts of 1408, top-6, first layer dense (10944).
DEEPSEEK_V2_LITE = PlanArch(
    27, 2048, 16, 16, 10944, num_experts=64, top_k=6, moe_ffn_hidden_size=1408,
    shared_expert_ffn_hidden_size=2 * 1408, first_dense_layers=1, kv_lora_rank=512, qk_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128,
)  # fmt: skip
# DeepSeek-V3 (DeepSeek-AI 2024, Table/HF config), without the MTP module: 671B total, 37B activated.
DEEPSEEK_V3 = PlanArch(
    61, 7168, 128, 128, 18432, num_experts=256, top_k=8, moe_ffn_hidden_size=2048,
    shared_expert_ffn_hidden_size=2048, first_dense_layers=3, kv_lora_rank=512, q_lora_rank=1536,
    qk_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
)  # fmt: skip


def test_mixtral_8x7b_exact_total_and_active():
    n = param_count(MIXTRAL_8X7B, vocab_size=32000)
    assert n.total == 46_702_792_704  # the released checkpoint's count ("46.7B")
    assert n.active == 12_879_925_248  # "12.9B active parameters" (Jiang et al. 2024)
    assert n.experts == 32 * 8 * 3 * 4096 * 14336


@pytest.mark.parametrize(
    ("arch", "vocab", "total", "active"),
    [(DEEPSEEK_V2_LITE, 102_400, 15.7e9, 2.4e9), (DEEPSEEK_V3, 129_280, 671e9, 37e9)],
)
def test_deepseek_mla_moe_counts(arch, vocab, total, active):
    n = param_count(arch, vocab_size=vocab)
    # The papers print 2-3 significant digits (15.7B, 2.4B, 671B, 37B); "activated" excludes the input
    # embedding (a lookup): 2.45B and 36.6B here.
    assert n.total == pytest.approx(total, rel=0.005)
    assert n.active - n.embedding == pytest.approx(active, rel=0.025)


def test_llama_arch_converts_and_dense_active_equals_total():
    a = as_plan_arch(sizes("llama3")["8B"])
    assert a.head_size == 128 and not a.is_moe and not a.is_mla
    n = param_count(a, vocab_size=128_256)
    assert n.active == n.total == 8_030_261_248 and n.experts == 0


def test_moe_flops_count_active_experts_only():
    seq, v = 4096, 32000
    moe = flops_per_token(MIXTRAL_8X7B, seq_length=seq, vocab_size=v)
    n = param_count(MIXTRAL_8X7B, vocab_size=v)
    # Megatron: 6 x (attention + top-2 expert MLPs + routers + logits) + causal-half scores 6 L (2 a d) s / 2.
    expected = 6 * (n.attention + n.mlp_active + v * 4096) + 6 * 32 * 2 * 4096 * seq / 2
    assert moe == pytest.approx(expected, rel=1e-12)
    # ~ 6 x active parameters (12.9B) plus the attention term: far from 6 x 46.7B.
    assert 6 * 12.6e9 < moe < 6 * 14e9


def test_mla_score_widths():
    # DeepSeek-V3 scores: QK^T over (128 + 64) per head, scores x V over 128, 128 heads.
    assert DEEPSEEK_V3.score_dims == (128 * 192, 128 * 128)
    f = flops_per_token(DEEPSEEK_V3, seq_length=4096, vocab_size=129_280)
    n = param_count(DEEPSEEK_V3, vocab_size=129_280)
    assert f == pytest.approx(
        6 * (n.attention + n.mlp_active + 129_280 * 7168) + 3 * 61 * 128 * (192 + 128) * 4096, rel=1e-12
    )
    titan = flops_per_token(DEEPSEEK_V3, seq_length=4096, vocab_size=129_280, convention="torchtitan")
    assert titan == pytest.approx(6 * (n.active - n.embedding) + 6 * 61 * 128 * 320 * 4096, rel=1e-12)
    with pytest.raises(ConfigError, match="flops.convention='palm'"):
        flops_per_token(DEEPSEEK_V3, seq_length=1, vocab_size=1, convention="palm")


def test_llama3_405b_training_flops():
    # Dubey et al. 2024: 405B on 15.6T tokens (8k context) is 3.8e25 FLOPs; 6ND alone gives 3.80e25.
    n = param_count(sizes("llama3")["405B"], vocab_size=128_256).total
    assert 6 * n * 15.6e12 == pytest.approx(3.8e25, rel=0.005)
    # The Megatron count adds the attention and logits terms: ~4% more at 8k context.
    f = flops_per_token(sizes("llama3")["405B"], seq_length=8192, vocab_size=128_256)
    assert 1.02 < f / (6 * n) < 1.06


def test_device_table_and_peaks():
    assert peak_flops("h100_sxm") == 989.4e12 and peak_flops("h100_sxm", "fp8") == 2 * 989.4e12
    assert peak_flops("h200") == peak_flops("h100_sxm") and DEVICES["h200"].memory_gb == 141
    assert peak_flops("a100_40gb") == peak_flops("a100") == 312e12
    assert peak_flops("b200") == 2.25e15 and peak_flops("mi300x") == pytest.approx(1307.4e12)
    assert DEVICES["h100_sxm"].intra_node_gbps == 450  # NVLink 4: 900 GB/s bidirectional
    with pytest.raises(ConfigError, match="dtype='fp8': a100 has no fp8 tensor peak"):
        peak_flops("a100", "fp8")
    with pytest.raises(ConfigError, match="cluster.gpu='tpu'"):
        peak_flops("tpu")
    # 1M H100-hours at 40% MFU: 1.42e24 FLOPs (about a 110B model at 20 tokens per parameter).
    assert budget_from_gpu_hours(1e6, gpu="h100_sxm", mfu=0.4) == pytest.approx(1.4248e24, rel=1e-4)


@pytest.mark.parametrize("family", ["llama3", "mistral", "mixtral", "deepseek_v2"])
def test_planner_count_equals_models_count_on_every_size(family):
    # The planner's minimal count (no biases, two norms per layer) agrees exactly with models/count.py on the
    # families without QKV biases or extra norms (qwen2, gemma2 differ by < 0.01%), so either can be used.
    from models import count
    from models.registry import sizes

    for name, arch in sizes(family).items():
        v = arch.vocab_size or 32000
        ours, theirs = param_count(as_plan_arch(arch), vocab_size=v), count.param_count(arch, vocab_size=v)
        assert (ours.total, ours.active) == (theirs.total, theirs.active), name
