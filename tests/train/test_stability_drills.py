"""Fault drills (issue 9): `python -m train` on 2 gloo processes with KILN_FAULT_NAN_AT_STEP making one step's
loss NaN on the last rank only, under each stability policy (train/stability.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL, read_metrics, run_train, train_losses
from train.stability import DIVERGED_EXIT_CODE, FAULT_ENV

pytestmark = pytest.mark.slow
STEPS = 12

BASE = SMALL + [
    "only_stage=base",
    "parallel.micro_batch=1",
    f"recipe.stages.base.tokens={STEPS * 2048}",
    "recipe.stages.base.batch_tokens=2048",
    "recipe.stages.base.warmup_tokens=4096",
    "stability.spike_sigmas=0",  # only the injected NaNs are bad steps
]


def drill(tmp_path: Path, data_cache: str, *extra: str, nan_at: str, check: bool = True):
    run_dir = tmp_path / "run"
    args = [*BASE, f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *extra]
    proc = run_train(args, cwd=ROOT, env={FAULT_ENV: nan_at}, check=check, timeout=600)
    records = read_metrics(run_dir)
    return proc, records, [r for r in records if r.get("event") == "stability"]


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if r["stage"] == "base" and key in r}


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, data_cache):
    return drill(tmp_path_factory.mktemp("skip"), data_cache, nan_at="5")


def test_skip_applies_no_update_and_finishes(skip_run):
    proc, records, events = skip_run
    (event,) = events
    assert (event["step"], event["action"], event["reason"]) == (5, "skip", "non-finite loss nan")
    assert event["stability/events"] == 1 and math.isfinite(event["stability/grad_norm"])
    losses, norms, updates = (by_step(records, k) for k in ("loss", "param_norm", "update_norm"))
    # Rank 0's own loss of step 5 was finite (the fault is on rank 1): it logs the value all ranks agreed on.
    assert sorted(losses) == list(range(1, STEPS + 1)) and math.isnan(losses[5])
    assert all(math.isfinite(v) for s, v in losses.items() if s != 5)
    # The weights after step 5 are exactly those after step 4; every other step moved them.
    assert updates[5] == 0.0 and norms[5] == norms[4]
    assert updates[1] == 0.0  # warm-up: the LR of step 1 is 0
    assert all(updates[s] > 0 for s in range(2, STEPS + 1) if s != 5)
    assert losses[STEPS] < losses[1] - 0.5  # and training went on
    assert "Bad steps (not applied; metrics.jsonl event=stability): base 1" in proc.stdout


def test_rollback_restores_the_last_checkpoint_and_moves_on(skip_run, tmp_path, data_cache):
    proc, records, events = drill(
        tmp_path,
        data_cache,
        "+recipe.stages.base.stability.policy=rollback",  # this stage only: the others save no checkpoints
        "recipe.stages.base.save_every_tokens=4096",  # checkpoints after steps 2, 4, 6, ...
        nan_at="5,8",
    )
    assert [(e["step"], e["action"], Path(e["checkpoint"]).name) for e in events] == [
        (5, "rollback", "step_000004"),
        (8, "rollback", "step_000006"),
    ]
    losses, norms = by_step(records, "loss"), by_step(records, "param_norm")
    assert sorted(losses) == list(range(1, STEPS + 1))  # the data position moved on past the bad batches
    # Step 5 rolled back to step 4's checkpoint: the same weights, optimizer and LR as skipping step 5.
    skip_losses = by_step(skip_run[1], "loss")
    for step in (1, 2, 3, 4, 6, 7):
        assert losses[step] == pytest.approx(skip_losses[step], rel=1e-6, abs=1e-6), step
    # Step 8 rolled back to step 6's checkpoint: step 7's update is undone too.
    assert norms[8] == pytest.approx(norms[6], rel=1e-7) and norms[8] != pytest.approx(norms[7], rel=1e-7)
    assert "rollback" in proc.stderr and losses[STEPS] < losses[1] - 0.5


def test_stop_exits_with_its_code_and_names_stage_step_loss_grad_norm(tmp_path, data_cache):
    proc, records, events = drill(tmp_path, data_cache, "stability.policy=stop", nan_at="3", check=False)
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-3000:]
    assert "kiln: diverged: stage 'base' step 3: non-finite loss nan (loss nan, grad norm " in proc.stderr
    assert "policy stop" in proc.stderr
    assert [(e["step"], e["action"]) for e in events] == [(3, "stop")]
    assert max(train_losses(records, "base")) == 2  # step 3 is only its event: nothing trained after it


def test_max_events_escalates_skip_to_stop(tmp_path, data_cache):
    proc, _, events = drill(tmp_path, data_cache, "stability.max_events=1", nan_at="2,3", check=False)
    assert proc.returncode == DIVERGED_EXIT_CODE
    assert [(e["step"], e["action"]) for e in events] == [(2, "skip"), (3, "stop")]
    assert "step 3: non-finite loss nan" in proc.stderr and "more than max_events=1" in proc.stderr


def test_deepspeed_skip_equals_the_megatron_skip(skip_run, tmp_path, data_cache):
    """DeepSpeed (ZeRO-1) skipping step 5 trains like the megatron engine skipping it: the same losses to
    float noise, while one applied update moves the later losses by ~0.1 nats (update_norm is not measured
    under DeepSpeed)."""
    _, records, events = drill(
        tmp_path, data_cache, "parallel=deepspeed_zero1", "parallel.micro_batch=1", nan_at="5"
    )
    assert [(e["step"], e["action"], e["reason"]) for e in events] == [(5, "skip", "non-finite loss nan")]
    losses, megatron = train_losses(records, "base"), train_losses(skip_run[1], "base")
    assert sorted(losses) == list(range(1, STEPS + 1)) and math.isnan(losses[5])
    for step in range(6, STEPS + 1):
        assert losses[step] == pytest.approx(megatron[step], abs=1e-4), step
