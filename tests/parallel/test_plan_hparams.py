"""Batch and LR laws against the DeepSeek LLM paper's own settings; warm-up and schedule rules."""

from __future__ import annotations

import pytest

from parallel.plan.flops import PlanArch
from parallel.plan.hparams import (
    deepseek_batch_tokens,
    deepseek_lr,
    hparams,
    non_embedding_flops_per_token,
    round_batch,
)
from train.errors import ConfigError


def _deepseek_m(layers, d, seq):
    return 72 * layers * d**2 + 12 * layers * d * seq  # DeepSeek LLM Eq. 2


@pytest.mark.parametrize(
    ("layers", "d", "batch", "lr"),
    # DeepSeek LLM Table 2: 7B (30 layers, d 4096): batch 2304 x 4096 tokens, lr 4.2e-4;
    # 67B (95 layers, d 8192): 4608 x 4096, lr 3.2e-4; both on 2T tokens.
    [(30, 4096, 2304 * 4096, 4.2e-4), (95, 8192, 4608 * 4096, 3.2e-4)],
)
def test_deepseek_law_reproduces_the_papers_7b_and_67b(layers, d, batch, lr):
    c = _deepseek_m(layers, d, 4096) * 2e12
    assert deepseek_batch_tokens(c) == pytest.approx(batch, rel=0.1)
    assert deepseek_lr(c) == pytest.approx(lr, rel=0.03)


def test_m_is_deepseeks_eq2_for_their_architecture():
    # 12 d^2 weights per layer (4 d^2 attention, 8 d^2 MLP: a SwiGLU of width 8d/3), full score matrix.
    a = PlanArch(30, 3072, 24, 24, 8192)  # 8192 = 8/3 x 3072
    assert non_embedding_flops_per_token(a, seq_length=4096, vocab_size=100) == pytest.approx(
        _deepseek_m(30, 3072, 4096), rel=1e-12
    )


def test_round_batch_to_power_of_two_and_layout_multiple():
    assert round_batch(1.0e6, seq_length=4096) == 256  # 244 sequences -> 256
    assert round_batch(1.0e6, seq_length=4096, multiple=24) == 264  # nearest multiple of DP x micro-batch
    assert round_batch(10, seq_length=4096, multiple=8) == 8  # at least one per rank


def test_hparams_cosine_and_wsd():
    h = hparams(flops=1e20, tokens=2e9, seq_length=4096)
    # B_opt(1e20) = 1.02M tokens -> 256 x 4096; eta_opt = 0.3118 x 1e20^-0.125 = 9.86e-4.
    assert h.batch_sequences == 256 and h.batch_tokens == 1_048_576
    assert h.lr == pytest.approx(9.86e-4, rel=1e-3) and h.min_lr == pytest.approx(h.lr / 10)
    assert h.tokens % h.batch_tokens == 0 and h.steps == 1907
    assert h.warmup_tokens == 190 * h.batch_tokens  # 10% of 1907 steps < 2000 steps
    long = hparams(flops=1e20, tokens=1e11, seq_length=4096)
    assert long.warmup_tokens == 2000 * long.batch_tokens
    w = hparams(flops=1e20, tokens=2e9, seq_length=4096, schedule="wsd")
    assert w.decay_tokens == 381 * w.batch_tokens and w.min_lr == 0 and w.decay_style == "1-sqrt"
    with pytest.raises(ConfigError, match="plan.schedule='step'"):
        hparams(flops=1e20, tokens=2e9, seq_length=4096, schedule="step")
