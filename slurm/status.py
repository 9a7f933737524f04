"""`python -m slurm status <run_dir>`: the jobs of the run's latest submission (state, reason, restarts, exit
code, from `scontrol`, or `sacct` once slurmctld has forgotten a job), each stage's last checkpoint, and the last
step logged to metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from slurm.submit import SlurmError, read_jobs
from train import checkpoint
from train.signals import EVENTS_FILE

REASONS = {
    "DependencyNeverSatisfied": "the job it waits on (afterok) failed, so it will never start; scancel {id} "
    "and submit again",
    "Dependency": "waiting for the job before it to finish",
    "BeginTime": "requeued; starts again in a few seconds",
}


@dataclass
class JobStatus:
    part: str
    job_id: str
    state: str
    reason: str = ""
    restarts: int = 0
    exit_code: str = ""
    checkpoint: str = ""
    """The stage's newest complete checkpoint (name, step, and whether it is final)."""
    last_step: int | None = None
    """The last training step of the stage logged to metrics.jsonl."""

    @property
    def note(self) -> str:
        if self.state == "PENDING" and self.reason in REASONS:
            return REASONS[self.reason].format(id=self.job_id)
        return ""


def _scontrol(job_id: str) -> dict[str, str] | None:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    fields = {}
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _sacct(job_id: str) -> dict[str, str] | None:
    if shutil.which("sacct") is None:
        return None
    proc = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"],
        capture_output=True,
        text=True,
    )
    rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.startswith(job_id)]
    if proc.returncode != 0 or not rows:
        return None
    _, state, exit_code, reason = rows[-1]
    return {"JobState": state.split()[0], "ExitCode": exit_code, "Reason": reason}


def _requeues(run_dir: str, job_id: str) -> int:
    path = os.path.join(run_dir, "slurm", EVENTS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return sum(1 for e in events if e.get("job") == job_id and e.get("action") == "requeue")


def _last_steps(run_dir: str) -> dict[str, int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    steps: dict[str, int] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "loss" in rec:
                    steps[rec["stage"]] = rec["step"]
    return steps


def _checkpoint(run_dir: str, stage: str) -> str:
    path = checkpoint.latest(checkpoint.stage_dir(run_dir, stage))
    if path is None:
        return ""
    state = checkpoint.read_state(path)
    return f"{os.path.basename(path)}{' (final)' if state.get('final') else ''}"


def job_status(run_dir: str) -> list[JobStatus]:
    """The state of every job of the run's latest submission. SlurmError when there is none or no Slurm."""
    history = read_jobs(os.path.join(run_dir, "slurm"))
    if not history:
        raise SlurmError(
            f"no jobs recorded in {run_dir}/slurm/jobs.json: submit with `python -m slurm submit`"
        )
    if shutil.which("scontrol") is None:
        raise SlurmError("scontrol not found on PATH: run status on a Slurm login node")
    steps = _last_steps(run_dir)
    out = []
    for job in history[-1]["jobs"]:
        jid = job["job_id"]
        info = _scontrol(jid) or _sacct(jid) or {"JobState": "UNKNOWN", "Reason": "forgotten by Slurm"}
        restarts = int(info["Restarts"]) if "Restarts" in info else _requeues(run_dir, jid)
        stage = job["part"]
        out.append(
            JobStatus(
                part=stage,
                job_id=jid,
                state=info.get("JobState", "UNKNOWN"),
                reason="" if info.get("Reason") in (None, "None") else info["Reason"],
                restarts=restarts,
                exit_code=info.get("ExitCode", ""),
                checkpoint=_checkpoint(run_dir, stage) if stage not in ("recipe", "data") else "",
                last_step=steps.get(stage),
            )
        )
    return out


def format_status(run_dir: str, jobs: list[JobStatus]) -> str:
    head = ("stage", "job", "state", "reason", "restarts", "exit", "last checkpoint", "last step")
    rows = [
        (
            j.part,
            j.job_id,
            j.state,
            j.reason or "-",
            str(j.restarts),
            j.exit_code or "-",
            j.checkpoint or "-",
            "-" if j.last_step is None else str(j.last_step),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"run {run_dir}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines += [f"{j.part} (job {j.job_id}): {j.note}" for j in jobs if j.note]
    return "\n".join(lines)
