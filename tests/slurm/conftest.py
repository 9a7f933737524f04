"""The real single-node Slurm of slurm/testing/ for the slow tests, and helpers to submit and wait."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _slurm_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "is UP" in proc.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local Slurm (installing its packages when missing) unless it is up; stop it afterwards if this
    session started it. Skips, with the reason, only where it cannot be started (no root, no apt-get)."""
    if _slurm_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("the local test Slurm needs root (slurm/testing/start.sh starts daemons as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is missing to install it")
    proc = subprocess.run([str(ROOT / "slurm/testing/start.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"could not start the local Slurm: {(proc.stdout + proc.stderr).strip()[-1500:]}")
    yield
    subprocess.run([str(ROOT / "slurm/testing/stop.sh")], capture_output=True, timeout=120)


def kiln_slurm(*args: str, cwd=ROOT, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "slurm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m slurm {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def submitted(stdout: str) -> dict[str, str]:
    """{part: job id} from `python -m slurm submit`'s output."""
    return dict(re.findall(r"^submitted (\S+): job (\d+)", stdout, flags=re.M))


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    info: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def wait_for(predicate, *, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(job_ids: list[str], *, timeout: float = 420) -> dict[str, dict[str, str]]:
    def done():
        infos = {j: job_info(j) for j in job_ids}
        return infos if all(i.get("JobState") in TERMINAL for i in infos.values()) else None

    return wait_for(done, timeout=timeout, what=f"jobs {job_ids} to end", every=1.0)


def job_log(run_dir, part_or_id: str) -> str:
    logs = sorted((run_dir / "slurm").glob("*.out"))
    return "".join(p.read_text() for p in logs if part_or_id in p.name)
