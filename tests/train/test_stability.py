"""Loss-spike / NaN detection and the policy decisions."""

from __future__ import annotations

import math

import pytest
import torch

from train import stability
from train.errors import ConfigError
from train.stability import DivergenceError, Guard, SpikeMonitor, StabilityConfig, for_stage


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
    assert [mon.action() for _ in range(4)] == [policy, policy, "stop", "stop"]
    assert mon.events == 4


def test_stop_policy_stops_at_the_first_bad_step():
    assert SpikeMonitor(StabilityConfig(policy="stop")).action() == "stop"


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="stability.policy='retry'"):
        StabilityConfig(policy="retry")
    with pytest.raises(ConfigError, match="stability.min_history"):
        StabilityConfig(window=5, min_history=6)


def test_stage_overrides_replace_only_the_fields_given():
    run = StabilityConfig(policy="skip", window=20, min_history=5)
    stage = for_stage(run, {"policy": "stop"}, key="recipe.stages.anneal.stability")
    assert (stage.policy, stage.window, stage.min_history) == ("stop", 20, 5)
    assert for_stage(run, {}, key="k") == run
    with pytest.raises(ConfigError, match="recipe.stages.anneal.stability.polcy=.*no such field"):
        for_stage(run, {"polcy": "stop"}, key="recipe.stages.anneal.stability")
    with pytest.raises(ConfigError, match="recipe.stages.anneal.stability.policy='retry'"):
        for_stage(run, {"policy": "retry"}, key="recipe.stages.anneal.stability")


def test_rollback_needs_checkpoints_within_the_stage():
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    with pytest.raises(
        ConfigError, match="recipe.stages.base.save_every_tokens=0: stability.policy=rollback"
    ):
        to_config(compose_cfg(["stability.policy=rollback", "recipe.stages.base.save_every_tokens=0"]))
    with pytest.raises(ConfigError, match="recipe.stages.anneal.save_every_tokens=0"):
        to_config(
            compose_cfg(
                [
                    "+recipe.stages.anneal.stability.policy=rollback",
                    "recipe.stages.anneal.save_every_tokens=0",
                    "recipe.stages.anneal.average_last=0",
                ]
            )
        )
    cfg = to_config(compose_cfg(["+recipe.stages.base.stability.policy=stop", "stability.max_events=3"]))
    assert cfg.stability.policy == "skip"
    assert for_stage(cfg.stability, cfg.recipe.stages["base"].stability, key="k") == StabilityConfig(
        policy="stop", max_events=3
    )


# ------------------------------------------------------------------ in a world of one (gloo process group)
def test_guard_records_the_agreed_values_and_stops_with_a_clear_error(megatron_world1, tmp_path, monkeypatch):
    guard = Guard(StabilityConfig(policy="skip", max_events=1), stage="base", device=megatron_world1)
    assert guard.check(1, 2.5, 1.25) and guard.event(1.25) is None
    monkeypatch.setenv(stability.FAULT_ENV, "2,4")  # this rank is the last one: its loss reads NaN
    assert not guard.check(2, 2.4, 0.9)
    event = guard.event(0.9)
    assert event["action"] == "skip" and event["reason"] == "non-finite loss nan" and event["step"] == 2
    assert math.isnan(event["stability/loss"]) and event["stability/grad_norm"] == 0.9
    assert guard.check(3, 2.3, 0.8) and list(guard.monitor.history) == [2.5, 2.3]
    assert not guard.check(4, 2.2, 0.7)
    assert guard.event(0.7)["action"] == "stop"  # max_events=1 exceeded
    with pytest.raises(
        DivergenceError, match=r"stage 'base' step 4: non-finite loss nan \(loss nan, grad norm 0.7\)"
    ):
        guard.stop(str(tmp_path))
    assert "more than max_events=1" in (tmp_path / stability.DIVERGED_FILE).read_text()


def test_guard_judges_the_grad_norm_after_the_step_where_the_engine_knows_it_only_then(megatron_world1):
    guard = Guard(StabilityConfig(), stage="base", device=megatron_world1)
    assert guard.check(1, 2.5, None)  # DeepSpeed: the loss alone before its step
    event = guard.event(float("inf"))
    assert event["reason"] == "non-finite gradient norm inf" and list(guard.monitor.history) == []


def _engine(device):
    from parallel.engines import OptimSettings, build_engine
    from parallel.layout import ParallelLayout
    from tests.parallel.parity_worker import build

    torch.manual_seed(0)
    return build_engine(
        ParallelLayout(nproc_per_node=1, micro_batch=2),
        build_model=lambda **kw: build(**kw),
        optim=OptimSettings(
            lr=1e-2, min_lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0
        ),
        device=device,
        dtype=torch.float32,
        grad_accum=4,
    )


def _snapshot(engine):
    """The rank's parameters and the torch optimizers' per-parameter state (Adam moments and step)."""
    params = [p.detach().clone() for m in engine.modules for p in m.parameters()]
    inner = [o.optimizer for o in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])]
    if hasattr(inner[0], "optimizer"):  # megatron's wrappers hold the torch optimizer
        inner = [o.optimizer for o in inner]
    moments = [t.clone() for o in inner for st in o.state.values() for t in st.values() if torch.is_tensor(t)]
    return params, moments


def test_megatron_step_refused_by_accept_changes_no_weight_or_moment(megatron_world1):
    from tests.parallel.parity_worker import MICRO, SEQ, global_batch

    engine = _engine(megatron_world1)
    seen = []

    def train_step(step, accept):
        b = global_batch(step)
        micro = [{k: v[i : i + MICRO] for k, v in b.items()} for i in range(0, len(b["tokens"]), MICRO)]
        engine.zero_grad()
        loss = engine.forward_backward(micro, seq_length=SEQ)
        return loss, engine.step(accept=lambda norm: seen.append(norm) or accept)

    train_step(0, True)  # Adam moments exist from here on
    params, moments = _snapshot(engine)
    _, norm = train_step(1, False)
    assert seen[-1] == norm and norm > 0
    after, after_moments = _snapshot(engine)
    assert len(moments) > 0 and all(torch.equal(a, b) for a, b in zip(params, after, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(moments, after_moments, strict=True))
    train_step(1, True)
    moved = _snapshot(engine)[0]
    assert max((a - b).abs().max().item() for a, b in zip(params, moved, strict=True)) > 1e-4
