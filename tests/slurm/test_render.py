"""sbatch scripts rendered from the run config: exact options, the srun+torchrun line, stage chains, job
arrays, and the errors for what cannot fit (no Slurm needed)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from slurm.submit import SlurmError, load_config, plan_data_array, plan_training, submit
from tests.conftest import ROOT
from train.config import slurm_time_seconds
from train.errors import ConfigError

H100_2N = [
    "cluster=h100_sxm",
    "parallel.nproc_per_node=8",
    "parallel.nnodes=2",
    "parallel.tp=2",
    "parallel.micro_batch=1",
]


def sbatch_options(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def srun_command(text: str) -> list[str]:
    """The srun line with its continuations, as the words bash will see."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    joined = []
    for line in lines[start:]:
        joined.append(line.rstrip(" \\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(joined).removesuffix(" &"))


def test_two_node_h100_job_options_and_torchrun_line(tmp_path):
    cfg = load_config(H100_2N)
    jobs = plan_training(cfg, [*H100_2N, "name=x${experiment}"])
    assert [(j.part, j.after) for j in jobs] == [
        ("base", None),
        ("long_context", "base"),
        ("anneal", "long_context"),
    ]
    text = jobs[1].text
    run_dir = os.path.join(os.getcwd(), "runs/kiln/default")
    assert sbatch_options(text) == [
        "--job-name=kiln-default-long_context",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--time=48:00:00",
        "--mem=0",
        "--exclusive",
        "--requeue",
        "--signal=B:USR1@300",
        "--open-mode=append",
        f"--chdir={os.getcwd()}",
        f"--output={run_dir}/slurm/%x-%j.out",
    ]
    assert "export NCCL_ASYNC_ERROR_HANDLING=1" in text.splitlines()
    assert f"export KILN_STOP_FILE={run_dir}/slurm/stop-$SLURM_JOB_ID" in text.splitlines()
    assert "MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))" in text.splitlines()
    words = srun_command(text)
    assert words[: words.index("bash")] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
    ]
    assert words[words.index("bash") : words.index("bash") + 4] == [
        "bash",
        "-c",
        'trap "" USR1; exec "$@"',
        "kiln-torchrun",
    ]
    launch = words[words.index("kiln-torchrun") + 1 :]
    assert launch[:11] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=$SLURM_NNODES",
        "--nproc_per_node=8",
        "--rdzv_id=$SLURM_JOB_ID",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT",
        "--max_restarts=0",
        "-m",
        "train",
    ]
    # The user's overrides reach the job verbatim (Hydra interpolations are not expanded by bash).
    assert launch[11:] == [*H100_2N, "name=x${experiment}", "only_stage=long_context"]
    # bash accepts the script.
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_cluster_options_venv_container_and_cpus():
    overrides = [
        "cluster.slurm.partition=gpu",
        "cluster.slurm.account=proj1",
        "cluster.slurm.qos=high",
        "cluster.slurm.constraint=h100",
        "cluster.slurm.cpus_per_node=8",
        "cluster.slurm.venv=/shared/venvs/kiln",
        "cluster.slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
        "cluster.slurm.container_mounts=/shared:/shared",
        "cluster.slurm.setup=['module load cuda/12.4']",
        "cluster.slurm.sbatch_args=['--reservation=r1']",
        "cluster.slurm.max_restarts=3",
        "cluster.slurm.signal_lead_s=120",
    ]
    cfg = load_config([*overrides, "only_stage=base"])
    (job,) = plan_training(cfg, overrides)
    opts = sbatch_options(job.text)
    for expected in (
        "--partition=gpu",
        "--account=proj1",
        "--qos=high",
        "--constraint=h100",
        "--cpus-per-task=8",
        "--signal=B:USR1@120",
        "--reservation=r1",
        "--job-name=kiln-default",
    ):
        assert expected in opts
    assert "--exclusive" not in opts and not any(o.startswith("--gpus") for o in opts)  # local: CPU, shared
    lines = job.text.splitlines()
    assert lines.index("module load cuda/12.4") < lines.index("source /shared/venvs/kiln/bin/activate")
    assert "export OMP_NUM_THREADS=4" in lines  # 8 CPUs over 2 processes
    words = srun_command(job.text)
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in words
    assert "--container-mounts=/shared:/shared" in words
    assert words[words.index("kiln-torchrun") + 1] == "python"  # the venv's / container's interpreter


def test_one_job_only_stage_and_single_stage_recipes_are_one_job():
    cfg = load_config([])
    assert [j.part for j in plan_training(cfg, [], one_job=True)] == ["recipe"]
    assert "only_stage" not in plan_training(cfg, [], one_job=True)[0].text
    cfg = load_config(["only_stage=anneal"])
    (job,) = plan_training(cfg, ["only_stage=anneal"])
    assert job.part == "anneal" and job.script.endswith("/slurm/anneal.sbatch")
    cfg = load_config(["~recipe.stages.long_context", "~recipe.stages.anneal"])
    assert [j.part for j in plan_training(cfg, [])] == ["recipe"]


def test_data_array_runs_one_shard_per_task():
    overrides = ["data.tokenizer.vocab_size=2048"]
    cfg = load_config(overrides)
    (job,) = plan_data_array(cfg, overrides, num_shards=4)
    opts = sbatch_options(job.text)
    assert "--array=0-3" in opts and "--nodes=1" in opts
    assert not any(o.startswith(("--requeue", "--signal")) for o in opts)
    assert opts[-1].endswith("/slurm/%x-%A_%a.out")
    words = srun_command(job.text)
    assert words[words.index("-m") - 1 :] == [
        sys.executable,
        "-m",
        "data",
        "data.tokenizer.vocab_size=2048",
        "data.shard_index=$SLURM_ARRAY_TASK_ID",  # expanded by bash in the job, one value per task
        "data.num_shards=4",
    ]
    with pytest.raises(ConfigError, match="--num-shards=0: must be >= 1"):
        plan_data_array(cfg, overrides, num_shards=0)


ONE_STAGE = ["~recipe.stages.long_context", "~recipe.stages.anneal", "parallel.micro_batch=1"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["cluster=h100_sxm", "parallel.nproc_per_node=16", "parallel.tp=2"],
            r"parallel.nproc_per_node=16: a h100_sxm node has 8 GPUs; .* parallel.nproc_per_node=8 parallel.nnodes=2",
        ),
        (
            ["cluster=h100_sxm", "parallel.nproc_per_node=12", "recipe.stages.base.batch_tokens=12288"],
            r"a h100_sxm node has 8 GPUs; the world size 12 is not a multiple of 8",
        ),
        (
            ["cluster=h100_sxm", "parallel.nproc_per_node=4", "parallel.nnodes=2"],
            r"parallel.nproc_per_node=4: a multi-node job uses whole h100_sxm nodes .* parallel.nnodes=1",
        ),
        (["parallel.nnodes=2"], r"parallel.nnodes=2: cluster local has max_nodes=1"),
    ],
)
def test_layouts_that_do_not_fit_the_nodes_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_training(load_config([*ONE_STAGE, *overrides]), overrides)


def test_tensor_parallel_must_stay_inside_a_node():
    overrides = [
        *ONE_STAGE,
        "model=llama3_8b",
        "cluster=h100_sxm",
        "cluster.gpus_per_node=4",
        "parallel.nproc_per_node=4",
        "parallel.nnodes=2",
        "parallel.tp=8",
    ]
    with pytest.raises(ConfigError, match=r"parallel.tp=8: tensor-parallel groups stay inside a node"):
        plan_training(load_config(overrides), overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["cluster=nope"],
            r"cluster='nope': no configs/cluster/nope.yaml; choose one of a100, h100_sxm, h200, local",
        ),
        (["cluster.slurm.time=4h"], r"cluster.slurm.time='4h': use Slurm's format"),
        (
            ["cluster.slurm.signal_lead_s=1800"],
            r"signal_lead_s=1800: .*shorter than the time limit \(1800 s\)",
        ),
        (["cluster.slurm.cpus_per_node=0"], r"cpus_per_node=0: must be >= 1"),
    ],
)
def test_bad_cluster_settings_name_the_key_and_fix(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("5:30", 330),
        ("04:00:00", 14400),
        ("2-00", 172800),
        ("1-02:03", 93780),
        ("1-0:0:5", 86405),
    ],
)
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_cli_dry_run_prints_scripts_and_writes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "slurm", "submit", "--dry-run", f"run_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("# ---- ")] == [
        f"# ---- {tmp_path}/run/slurm/{stage}.sbatch" for stage in ("base", "long_context", "anneal")
    ]
    assert not (tmp_path / "run").exists()


def test_missing_slurm_binaries_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = load_config([f"run_dir={tmp_path}/run"])
    with pytest.raises(SlurmError, match=r"sbatch not found on PATH: run on a Slurm login node"):
        submit(plan_training(cfg, []))
    assert not (tmp_path / "run").exists()
