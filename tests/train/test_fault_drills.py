"""Fault drills on 2 gloo processes under torchrun --max-restarts (parallel.max_restarts): one rank SIGKILLed
mid-step, or mid-way through a checkpoint save (KILN_FAULT, train/faults.py). torchrun restarts both workers,
they resume from the last complete checkpoint, and the whole run's loss curve (metrics.jsonl, the last record of
each step) equals an uninterrupted run's bit for bit."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, SMALL, read_metrics, run_train, train_losses

pytestmark = pytest.mark.slow
STEPS = 10

DRILL = SMALL + [
    "parallel.micro_batch=1",
    "parallel.max_restarts=1",
    "only_stage=base",
    f"recipe.stages.base.tokens={STEPS * 2048}",
    "recipe.stages.base.batch_tokens=2048",
    "recipe.stages.base.warmup_tokens=4096",
    "recipe.stages.base.save_every_tokens=4096",  # a checkpoint every 2 steps
]


def drill(run_dir: Path, data_cache: str, fault: str | None, *extra: str):
    env = {"KILN_FAULT": fault} if fault else {}
    env["KILN_DRILL"] = str(run_dir)  # inherited by every process of the run (see leftovers)
    args = [*DRILL, f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *extra]
    proc = run_train(args, cwd=ROOT, env=env)
    return proc, train_losses(read_metrics(run_dir), "base")


def leftovers(run_dir: Path) -> list[str]:
    """Processes of the drill still running after `python -m train` returned (a killed rank's checkpoint
    writers would be: they also hold the captured stdout/stderr open, which hangs run_train)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("KILN_DRILL") == str(run_dir):
                out.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> dict[int, float]:
    # Only the drills resume, so only they save mid-stage; the curve does not depend on it (4 saves fewer).
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _, losses = drill(run_dir, data_cache, None, "recipe.stages.base.save_every_tokens=0")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5  # it trains
    return losses


def assert_same_curve(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    assert [losses[s] for s in sorted(losses)] == [reference[s] for s in sorted(reference)]  # bit for bit


def test_rank_killed_mid_step_restarts_and_resumes_exactly(reference, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc, losses = drill(run_dir, data_cache, "step:1:7")  # rank 1 dies in step 7; step 6 was saved
    assert "SIGKILL rank 1 at step of step 7" in proc.stderr
    assert "resumed base at step 6 (12288 tokens)" in proc.stderr
    assert proc.stderr.count("world 2 (tp 1, dp 2)") == 2  # the first attempt and torchrun's restart
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r].count(7) == 1  # step 7 never finished before the kill
    assert_same_curve(losses, reference)
    assert leftovers(run_dir) == []


def test_rank_killed_during_save_falls_back_to_the_previous_checkpoint(reference, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    # Rank 0 dies inside the save of step 8, its shards written, before the COMPLETE record.
    proc, losses = drill(run_dir, data_cache, "save:0:8")
    stage = run_dir / "checkpoints" / "base"
    assert "SIGKILL rank 0 at save of step 8" in proc.stderr
    assert f"ignoring an unfinished save: {stage}/step_000008.tmp: no COMPLETE record" in proc.stderr
    assert "resumed base at step 6 (12288 tokens)" in proc.stderr
    # Steps 7 and 8 ran twice (the first time before the cut-off save; their metrics may not have reached
    # the file), the second time with the same losses.
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps.count(9) == steps.count(10) == 1
    assert_same_curve(losses, reference)
    assert not list(stage.glob("*.tmp"))  # the restarted save of step 8 replaced it
    assert (stage / "latest").read_text() == f"step_{STEPS:06d}"
    assert leftovers(run_dir) == []


def test_async_saves_keep_a_killed_run_exact(reference, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    env = {"KILN_FAULT": "step:1:7", "KILN_DRILL": str(run_dir)}
    args = [*DRILL, "checkpoint.async_save=true", f"run_dir={run_dir}", f"data.cache_dir={data_cache}"]
    proc = run_train(args, cwd=ROOT, env=env)
    assert "saving checkpoint" in proc.stderr and "in the background" in proc.stderr
    # The save of step 6 may still be unfinished when rank 1 dies in step 7: then step 4 is the resume point.
    resumed = [int(s) for s in ("4", "6") if f"resumed base at step {s} " in proc.stderr]
    assert len(resumed) == 1, proc.stderr[-3000:]
    assert_same_curve(train_losses(read_metrics(run_dir), "base"), reference)
    stage = run_dir / "checkpoints" / "base"
    assert (stage / "latest").read_text() == f"step_{STEPS:06d}" and not list(stage.glob("*.tmp"))
    assert leftovers(run_dir) == []
