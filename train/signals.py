"""Stop cleanly when Slurm says time is up: checkpoint, requeue, exit.

Slurm sends USR1 `signal_lead_s` before a job's time limit or preemption (`--signal=B:USR1@<lead>`, rendered by
slurm/render.py) and TERM at the end. Either sets a flag here; the batch shell also leaves a stop file
(`$KILN_STOP_FILE`, which tests can create by hand). After every step the loop asks `stop_requested()`: the flag
(or the file, seen by rank 0) is all-reduced with MAX, so every rank stops after the same step even when the
signal reached them between different steps. The loop then saves a checkpoint and calls `stop()`: rank 0 asks
Slurm to requeue the job (`scontrol requeue $SLURM_JOB_ID`, at most cluster.slurm.max_restarts times), and every
rank exits with STOP_EXIT_CODE. The requeued job keeps its id, finds the checkpoint in the deterministic run dir,
and resumes at the same step and data position.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_EXIT_CODE = 75
"""EX_TEMPFAIL of sysexits.h: stopped on request with a checkpoint; running again continues the run."""
STOP_FILE_ENV = "KILN_STOP_FILE"
EVENTS_FILE = "events.jsonl"
"""In <run_dir>/slurm/: one line per stop (job id, restart count, stage, step, action), read by `slurm status`."""

_received: list[str] = []


def _handler(signum: int, frame) -> None:
    _received.append(signal.Signals(signum).name)


def install() -> None:
    """Catch USR1 and TERM on this rank (call once per process, before training)."""
    _received.clear()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def _local_request() -> bool:
    if _received:
        return True
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and dist.get_rank() == 0 and os.path.exists(path)


def stop_requested(device: torch.device) -> bool:
    """Whether any rank was asked to stop; the same answer on every rank (a MAX all-reduce of one int)."""
    flag = torch.tensor([int(_local_request())], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def lead_too_short(*, step_s: float, save_s: float, lead_s: int) -> str | None:
    """Why `cluster.slurm.signal_lead_s` is too short for this run, or None. After Slurm's USR1 the ranks finish
    the step they are in and write a checkpoint; when that takes longer than the lead, the time limit kills the
    job first and it loses the work since its last periodic checkpoint."""
    need = step_s + save_s
    if need <= lead_s:
        return None
    return (
        f"cluster.slurm.signal_lead_s={lead_s}: one step ({step_s:.1f} s) + one checkpoint write ({save_s:.1f} s)"
        f" take {need:.1f} s, longer than the lead; a job stopped at its time limit loses the work since its"
        f" last checkpoint: set it to >= {math.ceil(2 * need)}"
    )


def stop(*, run_dir: str, max_restarts: int, stage: str, step: int, checkpoint: str) -> None:
    """After the checkpoint is saved on all ranks: requeue (rank 0, inside Slurm), then exit every rank."""
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    why = ", ".join(sorted(set(_received))) or f"stop file {os.environ.get(STOP_FILE_ENV)}"
    action = "exit"
    if dist.get_rank() == 0:
        if job is None:
            log.warning(
                "stopping at step %d of %s on request (%s); checkpoint %s", step, stage, why, checkpoint
            )
        elif restarts >= max_restarts:
            action = "max_restarts"
            log.error(
                "stopping at step %d of %s (%s): job %s already restarted %d times (cluster.slurm.max_restarts=%d);"
                " not requeueing. Checkpoint %s",
                step,
                stage,
                why,
                job,
                restarts,
                max_restarts,
                checkpoint,
            )
        else:
            action = "requeue"
            log.warning(
                "stopping at step %d of %s (%s); checkpoint %s; requeueing job %s (restart %d of at most %d)",
                step,
                stage,
                why,
                checkpoint,
                job,
                restarts + 1,
                max_restarts,
            )
        _record(run_dir, job=job, restarts=restarts, stage=stage, step=step, action=action, why=why)
        if action == "requeue":
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if proc.returncode != 0:
                log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
    dist.barrier()
    sys.exit(STOP_EXIT_CODE)


def _record(run_dir: str, **event) -> None:
    directory = os.path.join(run_dir, "slurm")
    os.makedirs(directory, exist_ok=True)
    event = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **event}
    with open(os.path.join(directory, EVENTS_FILE), "a") as f:
        f.write(json.dumps(event) + "\n")
