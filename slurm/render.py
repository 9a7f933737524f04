"""sbatch scripts rendered from the run config (CONVENTIONS 12: launching stays thin).

A training job is one task per node (`srun --ntasks-per-node=1`), each running torchrun with
`--nnodes=$SLURM_NNODES --nproc_per_node=<gpus>` and a c10d rendezvous on the first node at a port derived from
the job id, then `-m train` with the same overrides the user gave `python -m slurm submit`. Everything the job
needs is in the script text: these functions are pure, so tests read exactly what Slurm will run.

Preemption and time limits: `--signal=B:USR1@<lead>` signals the batch shell, which leaves a stop file for the
ranks (`KILN_STOP_FILE`, checked every step) and passes USR1 on through srun. torchrun itself ignores USR1 (an
ignored signal stays ignored across exec and into its workers until they install their own handler, see
train/signals.py), so only the ranks act: they agree on the flag, save a checkpoint, and rank 0 runs
`scontrol requeue`; `--requeue --open-mode=append` keep the job id and its log. Layout of torchtitan's
`multinode_trainer.slurm` and nanotron's `slurm_launcher.py`.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from train.config import TrainConfig
from train.errors import ConfigError

STOP_FILE = "stop-$SLURM_JOB_ID"
"""Per job id, in <run_dir>/slurm/: the batch shell writes it on USR1/TERM; the job's next start removes it."""


@dataclass(frozen=True)
class JobShape:
    nodes: int
    procs_per_node: int
    gpus: bool
    """Whether to ask Slurm for GPUs (`--gpus-per-node`); CPU clusters run processes only."""


def job_shape(cfg: TrainConfig) -> JobShape:
    """Nodes and processes per node of the run's layout on the cluster's nodes; ConfigError when they do not fit."""
    layout, cluster = cfg.parallel, cfg.cluster
    g, world = cluster.gpus_per_node, layout.world_size
    whole = f"parallel.nproc_per_node={g} parallel.nnodes={world // g}" if world % g == 0 else None
    if layout.nproc_per_node > g:
        fix = f"a {cluster.name} node has {g} GPUs; "
        fix += (
            f"spread the {world} processes over whole nodes: {whole}"
            if whole
            else f"the world size {world} is not a multiple of {g}: use a multiple of {g} processes"
        )
        raise ConfigError("parallel.nproc_per_node", layout.nproc_per_node, fix)
    if layout.nnodes > 1 and layout.nproc_per_node != g:
        raise ConfigError(
            "parallel.nproc_per_node",
            layout.nproc_per_node,
            f"a multi-node job uses whole {cluster.name} nodes ({g} GPUs each): "
            + (whole or f"the world size {world} is not a multiple of {g}; use a multiple of {g} processes"),
        )
    if layout.nnodes > cluster.max_nodes:
        raise ConfigError(
            "parallel.nnodes",
            layout.nnodes,
            f"cluster {cluster.name} has max_nodes={cluster.max_nodes}; use fewer nodes or raise cluster.max_nodes",
        )
    if layout.nproc_per_node % layout.tp:
        raise ConfigError(
            "parallel.tp",
            layout.tp,
            f"tensor-parallel groups stay inside a node: tp must divide the {layout.nproc_per_node} "
            "processes per node",
        )
    return JobShape(nodes=layout.nnodes, procs_per_node=layout.nproc_per_node, gpus=cluster.gpu != "cpu")


def job_name(cfg: TrainConfig, part: str | None = None) -> str:
    return "-".join(p for p in (cfg.experiment, cfg.name, part) if p).replace("/", "-")


def _q(text: str) -> str:
    return shlex.quote(str(text))


def _header(
    cfg: TrainConfig, *, name: str, shape: JobShape, output: str, root: str, array: str | None, requeue: bool
) -> list[str]:
    s = cfg.cluster.slurm
    opts = [f"--job-name={name}", f"--nodes={shape.nodes}", "--ntasks-per-node=1"]
    if shape.gpus:
        opts.append(f"--gpus-per-node={shape.procs_per_node}")
    if s.cpus_per_node:
        opts.append(f"--cpus-per-task={s.cpus_per_node}")
    opts.append(f"--time={s.time}")
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(s, key) is not None:
            opts.append(f"--{key}={getattr(s, key)}")
    if s.exclusive:
        opts.append("--exclusive")
    if array is not None:
        opts.append(f"--array={array}")
    if requeue:
        opts += ["--requeue", f"--signal=B:USR1@{s.signal_lead_s}"]
    opts += ["--open-mode=append", f"--chdir={root}", f"--output={output}"]
    opts += list(s.sbatch_args)
    return [f"#SBATCH {o}" for o in opts]


def _environment(cfg: TrainConfig, *, shape: JobShape) -> list[str]:
    s = cfg.cluster.slurm
    lines = ["set -uo pipefail", *s.setup]
    if s.venv:
        lines.append(f"source {_q(os.path.join(s.venv, 'bin', 'activate'))}")
    for key, value in s.env.items():
        lines.append(f"export {key}={_q(value)}")
    if s.cpus_per_node and "OMP_NUM_THREADS" not in s.env:
        lines.append(f"export OMP_NUM_THREADS={max(1, s.cpus_per_node // shape.procs_per_node)}")
    return lines


def python_for(cfg: TrainConfig) -> str:
    """The interpreter in the job: the configured one; `python` inside a venv or container; else this one."""
    s = cfg.cluster.slurm
    if s.python:
        return s.python
    return "python" if s.venv or s.container_image else sys.executable


def _srun(cfg: TrainConfig, *, shape: JobShape) -> str:
    s = cfg.cluster.slurm
    args = [f"srun --nodes={shape.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1"]
    if s.container_image:
        args.append(f"--container-image={_q(s.container_image)}")
        if s.container_mounts:
            args.append(f"--container-mounts={_q(s.container_mounts)}")
    return " ".join(args)


def render_train(
    cfg: TrainConfig, overrides: list[str], *, stage: str | None = None, root: str | None = None
) -> str:
    """The sbatch script of a training job: the whole recipe, or `only_stage=<stage>` of it."""
    shape = job_shape(cfg)
    root = os.path.abspath(root or os.getcwd())
    run_dir = os.path.join(root, cfg.run_dir)
    slurm_dir = os.path.join(run_dir, "slurm")
    name = job_name(cfg, stage)
    args = [*overrides, *([f"only_stage={stage}"] if stage else [])]
    s = cfg.cluster.slurm
    torchrun = [
        _q(python_for(cfg)),
        "-m torch.distributed.run",
        '--nnodes="$SLURM_NNODES"',
        f"--nproc_per_node={shape.procs_per_node}",
        '--rdzv_id="$SLURM_JOB_ID"',
        "--rdzv_backend=c10d",
        '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"',
        "--max_restarts=0",
        "-m train",
        *(_q(a) for a in args),
    ]
    lines = [
        "#!/bin/bash",
        f"# Rendered by `python -m slurm submit` for run {cfg.run_dir}{f' (stage {stage})' if stage else ''}.",
        "# Submit again by hand with: sbatch <this file>",
        *_header(
            cfg,
            name=name,
            shape=shape,
            output=os.path.join(slurm_dir, "%x-%j.out"),
            root=root,
            array=None,
            requeue=True,
        ),
        "",
        *_environment(cfg, shape=shape),
        f"export KILN_STOP_FILE={_q(slurm_dir)}/{STOP_FILE}",
        'rm -f "$KILN_STOP_FILE"',
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT=$(({s.port_base} + SLURM_JOB_ID % 10000))",
        'echo "kiln: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# Slurm's USR1 (time limit / preemption lead) and TERM reach this shell: leave the stop file the ranks check",
        "# every step, and pass USR1 on to them through srun.",
        'on_signal() { echo "kiln: got SIG$1 at $(date +%T)"; touch "$KILN_STOP_FILE"; '
        '[ "$1" = USR1 ] && kill -USR1 "$SRUN_PID" 2>/dev/null; }',
        "trap 'on_signal USR1' USR1",
        "trap 'on_signal TERM' TERM",
        "",
        "# torchrun ignores USR1 (the ignore survives exec into it and its workers); the ranks install a handler.",
        _srun(cfg, shape=shape) + " \\",
        '  bash -c \'trap "" USR1; exec "$@"\' kiln-torchrun \\',
        "  " + " \\\n  ".join(torchrun) + " &",
        "SRUN_PID=$!",
        "# `wait` returns early when a trapped signal arrives: wait again until srun has exited.",
        'while :; do wait "$SRUN_PID"; rc=$?; kill -0 "$SRUN_PID" 2>/dev/null || break; done',
        'echo "kiln: srun exited $rc at $(date +%T)"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def render_data_array(
    cfg: TrainConfig, overrides: list[str], *, num_shards: int, root: str | None = None
) -> str:
    """A job array preparing the data in `num_shards` shards: task i runs
    `python -m data <overrides> data.shard_index=i data.num_shards=N` (one process, no requeue needed: a shard
    that did not finish is redone by submitting again)."""
    if num_shards < 1:
        raise ConfigError("--num-shards", num_shards, "must be >= 1")
    root = os.path.abspath(root or os.getcwd())
    slurm_dir = os.path.join(root, cfg.run_dir, "slurm")
    shape = JobShape(nodes=1, procs_per_node=1, gpus=False)
    command = [
        _q(python_for(cfg)),
        "-m data",
        *(_q(a) for a in overrides),
        'data.shard_index="$SLURM_ARRAY_TASK_ID"',
        f"data.num_shards={num_shards}",
    ]
    lines = [
        "#!/bin/bash",
        f"# Rendered by `python -m slurm shard-data` for run {cfg.run_dir}: {num_shards} data shards.",
        "# Submit again by hand with: sbatch <this file>",
        *_header(
            cfg,
            name=job_name(cfg, "data"),
            shape=shape,
            output=os.path.join(slurm_dir, "%x-%A_%a.out"),
            root=root,
            array=f"0-{num_shards - 1}",
            requeue=False,
        ),
        "",
        *_environment(cfg, shape=shape),
        'echo "kiln: data shard $SLURM_ARRAY_TASK_ID of ' + str(num_shards) + ' (job $SLURM_JOB_ID)"',
        _srun(cfg, shape=shape) + " " + " ".join(command),
    ]
    return "\n".join(lines) + "\n"
