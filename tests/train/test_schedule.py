"""LR schedules: the LR at given token counts equals the closed forms, written out here independently."""

import math

import pytest
import torch

from train.schedule import build_scheduler

PEAK, MIN, TOKENS, WARMUP = 3e-3, 3e-4, 100_000, 10_000


def lr_after(tokens: int, **kw) -> float:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    args = dict(peak_lr=PEAK, min_lr=MIN, tokens=TOKENS, warmup_tokens=WARMUP, schedule="cosine") | kw
    sched = build_scheduler(opt, **args)
    sched.step(tokens)
    return opt.param_groups[0]["lr"]


def cosine(t):
    if t <= WARMUP:
        return PEAK * t / WARMUP
    r = (t - WARMUP) / (TOKENS - WARMUP)
    return MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * min(r, 1.0)))


def linear(t):
    if t <= WARMUP:
        return PEAK * t / WARMUP
    return MIN + (PEAK - MIN) * (1 - min((t - WARMUP) / (TOKENS - WARMUP), 1.0))


def wsd(t, decay, shape):
    if t <= WARMUP:
        return PEAK * t / WARMUP
    start = TOKENS - decay
    if t <= start:
        return PEAK
    r = min((t - start) / decay, 1.0)
    coeff = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)), "1-sqrt": 1 - math.sqrt(r)}[shape]
    return MIN + (PEAK - MIN) * coeff


POINTS = [0, 2_500, 10_000, 10_001, 40_000, 55_000, 79_999, 80_000, 85_000, 95_000, 99_999, 100_000, 120_000]


@pytest.mark.parametrize("t", POINTS)
def test_cosine_and_linear_match_closed_form(t):
    assert lr_after(t, schedule="cosine") == pytest.approx(cosine(t), rel=1e-12, abs=1e-15)
    assert lr_after(t, schedule="linear") == pytest.approx(linear(t), rel=1e-12, abs=1e-15)
    assert lr_after(t, schedule="constant") == pytest.approx(PEAK * t / WARMUP if t <= WARMUP else PEAK)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("t", POINTS)
def test_wsd_matches_closed_form(shape, t):
    got = lr_after(t, schedule="wsd", decay_tokens=20_000, decay_style=shape)
    assert got == pytest.approx(wsd(t, 20_000, shape), rel=1e-12, abs=1e-15)


def test_wsd_is_flat_then_decays_to_min():
    lrs = [lr_after(t, schedule="wsd", decay_tokens=20_000) for t in (10_000, 50_000, 80_000)]
    assert lrs == [PEAK, PEAK, PEAK]
    assert lr_after(90_000, schedule="wsd", decay_tokens=20_000) == pytest.approx(
        MIN + (PEAK - MIN) * (1 - math.sqrt(0.5))
    )
    assert lr_after(TOKENS, schedule="wsd", decay_tokens=20_000) == pytest.approx(MIN)


def test_anneal_linear_to_zero_from_checkpoint_lr():
    # The anneal stage: peak = the previous stage's last LR, no warm-up, linearly to exactly 0.
    got = [
        lr_after(t, peak_lr=1.7e-4, min_lr=0.0, warmup_tokens=0, schedule="linear")
        for t in (0, 25_000, TOKENS)
    ]
    assert got == pytest.approx([1.7e-4, 1.7e-4 * 0.75, 0.0])
