"""The memory model against the papers and Megatron's theoretical_memory_usage.py."""

from __future__ import annotations

import pytest

from models.registry import sizes
from parallel.plan.memory import (
    Layout,
    gpt_arch,
    layer_activation_bytes,
    memory_per_gpu,
    state_bytes,
    table2_layer_bytes,
)
from train.errors import ConfigError

# Korthikanti et al. 2022, Table 1 / Sec. 5: GPT-3 175B and MT-NLG 530B at s = 2048.
GPT3 = {"h": 12288, "a": 96, "L": 96}
MTNLG = {"h": 20480, "a": 128, "L": 105}


@pytest.mark.parametrize(
    ("t", "sp", "recompute", "table2"),
    [
        (1, False, "none", lambda s, b, h, a, t: s * b * h * (34 + 5 * a * s / h)),
        (8, False, "none", lambda s, b, h, a, t: s * b * h * (10 + 24 / t + 5 * a * s / (h * t))),
        (8, True, "none", lambda s, b, h, a, t: s * b * h / t * (34 + 5 * a * s / h)),
        (8, False, "selective", lambda s, b, h, a, t: s * b * h * (10 + 24 / t)),
        (8, True, "selective", lambda s, b, h, a, t: s * b * h * 34 / t),
        (8, False, "full", lambda s, b, h, a, t: 2 * s * b * h),
    ],
)
@pytest.mark.parametrize("model", [GPT3, MTNLG])
def test_korthikanti_table2_rows(t, sp, recompute, table2, model):
    s, b, h, a = 2048, 1, model["h"], model["a"]
    expected = table2(s, b, h, a, t)
    assert table2_layer_bytes(s=s, b=b, h=h, a=a, t=t, sp=sp, recompute=recompute) == pytest.approx(expected)
    # The itemized generalization equals Table 2 on the paper's layer (MHA, 4h GELU, dropout, no flash).
    item = layer_activation_bytes(
        gpt_arch(h=h, a=a), s=s, b=b, t=t, sp=sp, recompute=recompute, dropout=True, flash=False, moe=False
    )
    assert item == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("model", "saving"), [(GPT3, 0.70), (MTNLG, 0.65)])
def test_selective_recompute_saves_what_the_paper_reports(model, saving):
    # Sec. 4.2.2: "for GPT-3 this results in a 70% reduction ... 65% for MT-NLG" (of the layer's activations).
    kw = {"s": 2048, "b": 1, "h": model["h"], "a": model["a"], "t": 8, "sp": True}
    full = table2_layer_bytes(**kw, recompute="none")
    assert 1 - table2_layer_bytes(**kw, recompute="selective") / full == pytest.approx(saving, abs=0.005)


def test_sequence_parallel_and_selective_cut_5x():
    # Abstract: together they "reduce activation memory by 5x" against tensor parallelism alone (MT-NLG, t = 8).
    kw = {"s": 2048, "b": 1, "h": MTNLG["h"], "a": MTNLG["a"], "t": 8}
    ratio = table2_layer_bytes(**kw, recompute="none") / table2_layer_bytes(
        **kw, sp=True, recompute="selective"
    )
    assert ratio == pytest.approx(4.94, abs=0.01)


def test_zero_paper_figure1_7_5b_on_64_gpus():
    # Rajbhandari et al. 2020, Fig. 1: Psi = 7.5B, K = 12, N_d = 64: 120, 31.4, 16.6, 1.9 GB.
    for zero, gb in [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)]:
        assert sum(state_bytes(7.5e9, dp=64, engine="deepspeed", zero=zero)) / 1e9 == pytest.approx(
            gb, abs=0.05
        )
    # Megatron: 18 bytes per parameter, 6 + 12/DP with the distributed optimizer.
    assert sum(state_bytes(1e9, dp=8, engine="megatron", zero=0)) == 18e9
    assert sum(state_bytes(1e9, dp=8, engine="megatron", zero=1)) == pytest.approx((6 + 12 / 8) * 1e9)
    with pytest.raises(ConfigError, match="parallel.zero=3: the megatron engine shards optimizer state only"):
        state_bytes(1e9, dp=8, engine="megatron", zero=3)


def _megatron_theoretical(arch, *, v, s, b, tp, pp, dp, m, vpp=None, distributed_optimizer=True):
    """Megatron-LM theoretical_memory_usage.py for a dense RMSNorm model without biases, SP + selective."""
    h, L, f = arch.hidden_size, arch.num_layers, arch.ffn_hidden_size
    q = arch.num_attention_heads * arch.head_size
    glu = 3 / 2 if arch.gated_mlp else 1
    layer = 2 * h * (f * glu + 1) + 2 * h * h * ((1 + arch.num_kv_heads / arch.num_attention_heads) * q / h)
    block, emb = layer * L + h, h * v
    shard = (block / pp + emb) / tp + (emb / tp if (not arch.tie_embeddings and pp == 1) else 0)
    states = shard * (6 + 12 / dp if distributed_optimizer else 18)
    act = s * b * h * (18 + 4 * f / h) * L + 8 * s * b * pp + s * b * h * pp
    if vpp is not None:
        act *= 1 + (pp - 1) / (pp * vpp)
    if vpp is None and pp > 1:
        act *= min(1, m / pp)
    if pp == 1:
        act += s * b * h * 4 * (1 + v / h)
    return states, act / tp


@pytest.mark.parametrize(
    ("tp", "pp", "dp", "m", "vpp"),
    [(8, 8, 8, 64, 1), (8, 1, 16, 8, 1), (4, 16, 2, 8, 1), (8, 8, 4, 32, 3), (2, 4, 1, 2, 1)],
)
def test_gpt3_175b_matches_megatron_theoretical_memory(tp, pp, dp, m, vpp):
    arch = gpt_arch(h=GPT3["h"], a=GPT3["a"], layers=GPT3["L"])
    layout = Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, sp=True, micro_batch=1, recompute="selective")
    mem = memory_per_gpu(
        arch,
        layout,
        vocab_size=51200,
        seq_length=2048,
        num_microbatches=m,
        dropout=True,
        flash_attention=False,
    )
    states, act = _megatron_theoretical(
        arch, v=51200, s=2048, b=1, tp=tp, pp=pp, dp=dp, m=m, vpp=vpp if vpp > 1 else None
    )
    assert mem.states == pytest.approx(states, rel=1e-9)
    assert mem.activations == pytest.approx(act, rel=1e-9)
    assert mem.total == pytest.approx(1.1 * (states + act), rel=1e-9)  # the default 10% margin


def test_llama3_70b_on_h100_layouts():
    arch = sizes("llama3")["70B"]
    kw = {"vocab_size": 128_256, "seq_length": 8192, "num_microbatches": 16}
    # TP8 x PP4, DP 4, SP + selective, micro-batch 1: ~35 GB states + activations: fits an 80 GB H100.
    fits = memory_per_gpu(arch, Layout(tp=8, pp=4, dp=4, sp=True, recompute="selective"), **kw)
    assert 20e9 < fits.total < 60e9
    # The same model on 8 GPUs with TP8 alone: 70.6B x (6 + 12) / 8 bytes of states = 159 GB, far over 80 GB.
    over = memory_per_gpu(arch, Layout(tp=8, dp=1, sp=True, recompute="selective", zero=0), **kw)
    assert over.states / 1e9 == pytest.approx(70.55 * 18 / 8, rel=0.01)
    # Full recompute keeps only each layer's input: less than selective.
    full = memory_per_gpu(arch, Layout(tp=8, pp=4, dp=4, sp=True, recompute="full"), **kw)
    assert full.activations < fits.activations


def test_moe_expert_parallel_shards_experts():
    from tests.parallel.test_plan_flops import MIXTRAL_8X7B

    kw = {"vocab_size": 32000, "seq_length": 4096, "num_microbatches": 8}
    ep1 = memory_per_gpu(MIXTRAL_8X7B, Layout(tp=1, dp=8, ep=1), **kw)
    ep8 = memory_per_gpu(MIXTRAL_8X7B, Layout(tp=1, dp=8, ep=8), **kw)
    experts = 32 * 8 * 3 * 4096 * 14336
    # bf16 weights of the experts: all of them on each GPU at EP 1, one eighth at EP 8.
    assert ep1.weights - ep8.weights == pytest.approx(2 * experts * (1 - 1 / 8), rel=1e-9)
    with pytest.raises(ConfigError, match="plan.recompute='some'"):
        memory_per_gpu(MIXTRAL_8X7B, Layout(recompute="some"), **kw)
