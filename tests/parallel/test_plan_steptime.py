"""The step-time roofline in closed form: compute at an efficiency, bubble, TP/DP/PP communication."""

from __future__ import annotations

import pytest

from models.registry import sizes
from parallel.plan.flops import flops_per_token
from parallel.plan.memory import Layout
from parallel.plan.steptime import Link, step_time

A8B = sizes("llama3")["8B"]
V = 128_256
H100 = Link(gpus_per_node=8, intra_gbps=450, inter_gbps=50)
PEAK = 989.4e12


def _st(layout, *, batch=64, seq=8192, link=H100, eff=0.5):
    return step_time(
        A8B,
        layout,
        vocab_size=V,
        seq_length=seq,
        batch_sequences=batch,
        peak_flops=PEAK,
        link=link,
        efficiency=eff,
    )


def test_single_gpu_is_pure_compute_at_the_efficiency():
    st = _st(Layout())
    model = flops_per_token(A8B, seq_length=8192, vocab_size=V) * 64 * 8192
    assert st.model_flops == pytest.approx(model)
    assert st.total == st.compute == pytest.approx(model / (PEAK * 0.5))
    assert st.mfu == pytest.approx(0.5)


def test_pipeline_bubble_is_p_minus_1_over_v_m():
    st = _st(Layout(pp=4, dp=2, micro_batch=1))  # m = 64 / 2 = 32 micro-batches
    assert st.bubble == pytest.approx(st.compute * 3 / 32)
    vst = _st(Layout(pp=4, dp=2, vpp=2, micro_batch=1))
    assert vst.bubble == pytest.approx(st.compute * 3 / 64)
    # p2p: (m + p - 1) x (activation + gradient) of s b h bf16 over the node's links (8 GPUs, one node).
    assert st.pp == pytest.approx((32 + 3) * 2 * 8192 * 4096 * 2 / 450e9)


def test_tensor_parallel_all_reduces():
    st = _st(Layout(tp=8, sp=True, micro_batch=1))  # m = 64 micro-batches, 32 layers
    per = 2 * 7 / 8 * 8192 * 4096 * 2 / 450e9  # one ring all-reduce of s b h bf16 over NVLink
    assert st.tp == pytest.approx(32 * 64 * 4 * per)
    full = _st(Layout(tp=8, sp=True, micro_batch=1, recompute="full"))
    assert full.tp == pytest.approx(32 * 64 * 6 * per)
    # Full recompute re-runs the layers' forward: (model - logits) / 3 more FLOPs.
    logits = 6 * V * 4096 * 64 * 8192
    assert full.compute / st.compute == pytest.approx(1 + (st.model_flops - logits) / 3 / st.model_flops)


def test_data_parallel_exposed_only_beyond_the_backward():
    st = _st(Layout(dp=16), batch=64)  # two nodes: grads over 50 GB/s, well hidden by the backward
    assert st.dp == 0.0
    slow = _st(Layout(dp=16), batch=16, link=Link(8, 450, 0.5))
    volume = 2 * 15 / 16 * 8_030_261_248 * 2
    assert slow.dp == pytest.approx(volume / 0.5e9 - 2 / 3 * slow.compute)
    assert slow.mfu < st.mfu
