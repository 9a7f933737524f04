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


def wsd_s(t, decay, shape, ends):
    """WSD-S written out: warm-up, then per branch [previous end, end]: the peak, then `decay` tokens down
    to MIN ending exactly at the branch end; right after a branch end, the peak again."""
    if t <= WARMUP:
        return PEAK * t / WARMUP
    if t > ends[-1]:
        return MIN
    end = min(e for e in ends if t <= e)
    if t <= end - decay:
        return PEAK
    r = (t - (end - decay)) / decay
    coeff = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)), "1-sqrt": 1 - math.sqrt(r)}[shape]
    return MIN + (PEAK - MIN) * coeff


WSD_S_POINTS = [0, 5_000, 10_000, 20_000, 30_000, 35_000, 39_999, 40_000, 40_001, 50_000, 60_000, 70_000]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("t", WSD_S_POINTS + POINTS[6:])
def test_wsd_s_matches_closed_form(shape, t):
    got = lr_after(
        t, schedule="wsd_s", decay_tokens=10_000, decay_style=shape, branch_tokens=[40_000, 70_000]
    )
    assert got == pytest.approx(wsd_s(t, 10_000, shape, [40_000, 70_000, TOKENS]), rel=1e-12, abs=1e-15)


def test_wsd_s_decays_to_min_at_each_branch_then_returns_to_the_peak():
    lr = {t: lr_after(t, schedule="wsd_s", decay_tokens=10_000, branch_tokens=[40_000]) for t in WSD_S_POINTS}
    assert lr[30_000] == lr[50_000] == lr[60_000] == PEAK
    assert lr[40_000] == pytest.approx(MIN) and lr[35_000] == pytest.approx(
        MIN + (PEAK - MIN) * (1 - 0.5**0.5)
    )
    assert lr[40_001] == PEAK  # straight back up, no second warm-up
    assert lr_after(TOKENS, schedule="wsd_s", decay_tokens=10_000, branch_tokens=[40_000]) == pytest.approx(
        MIN
    )
