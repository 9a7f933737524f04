"""Loss-spike / NaN detection and the policy decisions."""

from __future__ import annotations

import math

import pytest

from train.errors import ConfigError
from train.stability import DivergenceError, SpikeMonitor, StabilityConfig


def warmed(cfg: StabilityConfig, losses) -> SpikeMonitor:
    mon = SpikeMonitor(cfg)
    for x in losses:
        assert mon.judge(x, 1.0) is None
    return mon


def test_non_finite_loss_or_grad_norm_is_bad_from_the_first_step():
    mon = SpikeMonitor(StabilityConfig())
    assert mon.judge(float("nan"), 1.0) == "non-finite loss nan"
    assert mon.judge(2.0, float("inf")) == "non-finite gradient norm inf"
    assert list(mon.history) == []  # bad steps never enter the history


def test_spike_threshold_is_mean_plus_sigmas_times_std():
    cfg = StabilityConfig(spike_sigmas=3.0, spike_min_rel=0.0, window=4, min_history=4)
    mon = warmed(cfg, [2.0, 2.2, 2.0, 2.2])  # mean 2.1, sample std 0.11547
    limit = 2.1 + 3 * math.sqrt(4 * 0.01 / 3)
    assert mon.judge(limit - 1e-6, 1.0) is None
    mon = warmed(cfg, [2.0, 2.2, 2.0, 2.2])
    reason = mon.judge(limit + 1e-3, 1.0)
    assert reason is not None and reason.startswith("loss spike") and f"{limit:.4f}" in reason


def test_relative_floor_keeps_a_flat_curve_from_flagging_wiggles():
    cfg = StabilityConfig(spike_sigmas=3.0, spike_min_rel=0.1, window=10, min_history=5)
    assert warmed(cfg, [3.0] * 10).judge(3.29, 1.0) is None  # std 0: only the 10% floor (3.3) applies
    assert "> 3.3000" in warmed(cfg, [3.0] * 10).judge(3.31, 1.0)


def test_no_spike_judgement_before_min_history_and_window_slides():
    cfg = StabilityConfig(spike_sigmas=2.0, window=3, min_history=3)
    mon = warmed(cfg, [1.0, 100.0])  # too little history: a jump is accepted
    assert mon.judge(5.0, 1.0) is None and list(mon.history) == [1.0, 100.0, 5.0]
    mon.judge(6.0, 1.0)
    assert list(mon.history) == [100.0, 5.0, 6.0]


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_policy_action_then_escalation_to_stop(policy):
    mon = SpikeMonitor(StabilityConfig(policy=policy, max_events=2))
    assert mon.action("non-finite loss nan", step=5) == policy
    assert mon.action("non-finite loss nan", step=6) == policy
    with pytest.raises(
        DivergenceError, match="step 7: non-finite loss nan; stopping \\(more than 2 bad steps\\)"
    ):
        mon.action("non-finite loss nan", step=7)


def test_stop_policy_raises_at_once():
    with pytest.raises(DivergenceError, match="policy stop"):
        SpikeMonitor(StabilityConfig(policy="stop")).action("loss spike", step=1)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="stability.policy='retry'"):
        StabilityConfig(policy="retry")
    with pytest.raises(ConfigError, match="stability.min_history"):
        StabilityConfig(window=5, min_history=6)
