"""Kiln on a real Slurm (slurm/testing/start.sh): srun+torchrun jobs, stage chains, USR1 requeue with exact
resume, sbatch's own errors, and a Hydra sweep through the submitit launcher."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, SMALL, read_metrics, run_train, train_losses
from tests.slurm.conftest import job_info, job_log, kiln_slurm, submitted, wait_done, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

TINY = [
    *SMALL,
    "parallel.micro_batch=1",
    "recipe.stages.base.batch_tokens=2048",
    "recipe.stages.base.warmup_tokens=0",
]
CHAIN = [
    *TINY,
    "~recipe.stages.anneal",
    f"recipe.stages.base.tokens={16 * 2048}",
    "recipe.stages.long_context.seq_length=512",
    "recipe.stages.long_context.rope_scaling_factor=2.0",
    "recipe.stages.long_context.tokens=4096",  # 2 steps
    "recipe.stages.long_context.batch_tokens=2048",
    "recipe.stages.long_context.warmup_tokens=0",
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_cache, slurm_cluster):
    """The 2-stage recipe submitted as a chain, run to its end: (run_dir, {stage: job id}, {job id: info})."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    proc = kiln_slurm("submit", *CHAIN, f"data.cache_dir={data_cache}", f"run_dir={run_dir}")
    ids = submitted(proc.stdout)
    return run_dir, ids, wait_done(list(ids.values()))


def test_two_stage_chain_runs_in_order_with_srun_torchrun(chain):
    run_dir, ids, infos = chain
    assert list(ids) == ["base", "long_context"]
    for job in ids.values():
        assert (infos[job]["JobState"], infos[job]["ExitCode"]) == ("COMPLETED", "0:0"), job_log(run_dir, job)
    assert infos[ids["long_context"]]["Dependency"] == "(null)"  # it was afterok:<base> until base ended OK
    assert infos[ids["long_context"]]["StartTime"] >= infos[ids["base"]]["EndTime"]
    for job in ids.values():
        log = job_log(run_dir, job)
        # One srun task on the node running torchrun with 2 ranks, rendezvous on the port from the job id.
        assert f"rendezvous localhost:{15000 + int(job) % 10000}" in log
        assert "world 2 (tp 1, dp 2)" in log
        assert "kiln: srun exited 0" in log
    records = read_metrics(run_dir)
    assert sorted(train_losses(records, "base")) == list(range(1, 17))
    assert sorted(train_losses(records, "long_context")) == [1, 2]
    status = kiln_slurm("status", str(run_dir)).stdout
    rows = {line.split()[0]: line.split() for line in status.splitlines()[2:]}
    assert rows["base"][1:] == [ids["base"], "COMPLETED", "-", "0", "0:0", "step_000016", "(final)", "16"]
    assert rows["long_context"][1:] == [
        ids["long_context"],
        "COMPLETED",
        "-",
        "0",
        "0:0",
        "step_000002",
        "(final)",
        "2",
    ]


def test_failed_first_stage_leaves_the_next_pending_and_status_says_why(tmp_path):
    run_dir = tmp_path / "broken"
    fail = "cluster.slurm.setup=['echo kiln-test: this stage fails; exit 3']"
    ids = submitted(kiln_slurm("submit", *CHAIN, fail, f"run_dir={run_dir}").stdout)
    try:
        base = wait_done([ids["base"]])[ids["base"]]
        assert (base["JobState"], base["ExitCode"]) == ("FAILED", "3:0")
        assert "kiln-test: this stage fails" in job_log(run_dir, ids["base"])
        second = wait_for(
            lambda: (i := job_info(ids["long_context"])).get("Reason") == "DependencyNeverSatisfied" and i,
            timeout=60,
            what="the dependent stage to be marked DependencyNeverSatisfied",
        )
        assert second["JobState"] == "PENDING"
        status = kiln_slurm("status", str(run_dir)).stdout
        rows = {line.split()[0]: line.split()[1:5] for line in status.splitlines()[2:4]}
        assert rows["base"] == [ids["base"], "FAILED", "NonZeroExitCode", "0"]
        assert rows["long_context"] == [ids["long_context"], "PENDING", "DependencyNeverSatisfied", "0"]
        assert (
            f"long_context (job {ids['long_context']}): the job it waits on (afterok) failed, so it will never "
            f"start; scancel {ids['long_context']} and submit again"
        ) in status
    finally:
        subprocess.run(["scancel", *ids.values()])


def test_usr1_checkpoints_requeues_and_resumes_with_identical_losses(tmp_path, data_cache, chain):
    """The chain's base stage again, alone, signalled mid-stage: it must end with the chain's losses."""
    steps = 16
    run_dir = tmp_path / "requeued"
    args = [*CHAIN, "only_stage=base", f"data.cache_dir={data_cache}", f"run_dir={run_dir}"]
    (job,) = submitted(kiln_slurm("submit", *args).stdout).values()
    metrics = run_dir / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 2,
        timeout=400,
        what="the job to train 2 steps",
        every=0.1,
    )
    # What `--signal=B:USR1@<lead>` does at the lead time: USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_done([job])[job]
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1")
    (event,) = [json.loads(line) for line in (run_dir / "slurm" / "events.jsonl").read_text().splitlines()]
    assert (event["job"], event["action"], event["why"], event["restarts"]) == (job, "requeue", "SIGUSR1", 0)
    stopped = event["step"]
    assert 2 <= stopped < steps, "the signal must land mid-stage"
    log = job_log(run_dir, job)
    assert "kiln: got SIGUSR1" in log
    assert f"saved checkpoint {run_dir}/checkpoints/base/step_{stopped:06d}" in log
    assert f"kiln: job {job} (restart 1)" in log  # same job id, same (appended) log
    assert f"resumed base at step {stopped} ({stopped * 2048} tokens)" in log
    losses = train_losses(read_metrics(run_dir), "base")
    expected = train_losses(read_metrics(chain[0]), "base")  # the same stage, never interrupted
    assert sorted(losses) == sorted(expected) == list(range(1, steps + 1))
    assert losses == expected
    status = kiln_slurm("status", str(run_dir)).stdout
    assert status.splitlines()[2].split()[:5] == ["base", job, "COMPLETED", "-", "1"]


def test_sbatch_rejection_carries_slurms_error_line(tmp_path):
    proc = kiln_slurm("submit", "cluster.slurm.partition=nope", f"run_dir={tmp_path}/run", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"kiln: sbatch refused {tmp_path}/run/slurm/base.sbatch: "
        "sbatch: error: Batch job submission failed: Invalid partition name specified"
    )
    assert not (tmp_path / "run" / "slurm" / "jobs.json").exists()


def test_hydra_multirun_sweep_through_submitit(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    proc = run_train(
        [
            "--multirun",
            "hydra/launcher=submitit_slurm",
            f"hydra.sweep.dir={sweep}",
            "name=lr${hydra:job.num}",
            f"run_dir={sweep}/" + "${name}",
            *TINY,
            "parallel=single",
            "parallel.micro_batch=1",
            "recipe.stages.base.tokens=8192",
            "recipe.stages.base.lr=1e-3,3e-3",
            "only_stage=base",
            f"data.cache_dir={data_cache}",
        ],
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0
    for num, lr in enumerate((1e-3, 3e-3)):
        records = read_metrics(sweep / f"lr{num}")
        first = next(r for r in records if r.get("step") == 1 and "lr" in r)
        assert first["lr"] == pytest.approx(lr, rel=1e-12)
        assert sorted(train_losses(records, "base")) == list(range(1, 17))
        assert (sweep / f"lr{num}" / "report.md").exists()
    # Both points ran as Slurm jobs: submitit kept each job's result next to its log.
    results = sorted((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2
    for result in results:
        assert job_info(result.parent.name)["JobState"] == "COMPLETED"
