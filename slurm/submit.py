"""Compose the run config from `python -m train`'s overrides, render the sbatch scripts into the run dir, submit
them (a multi-stage recipe as one job per stage chained with `--dependency=afterok:`), and record the job ids in
`<run_dir>/slurm/jobs.json` for `python -m slurm status`."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from slurm import render
from train.config import TrainConfig, register, to_config
from train.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
JOBS_FILE = "jobs.json"


class SlurmError(RuntimeError):
    """Slurm is missing or refused something; the message names the cause (and carries Slurm's own error line)."""


@dataclass
class Job:
    part: str
    """The stage this job trains, "recipe" for a whole-recipe job, or "data" for a shard array."""
    script: str
    """Path of the rendered sbatch script (in <run_dir>/slurm/)."""
    text: str
    after: str | None = None
    """The part whose job must end OK first (afterok)."""
    job_id: str | None = None


def load_config(overrides: list[str]) -> TrainConfig:
    """The run config `python -m train <overrides>` would run, validated (ConfigError when it is not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            dcfg = compose(config_name="config", overrides=overrides)
        except HydraException as e:
            for o in overrides:
                group, _, option = o.partition("=")
                if (CONFIG_DIR / group).is_dir() and not (CONFIG_DIR / group / f"{option}.yaml").exists():
                    choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
                    raise ConfigError(
                        group, option, f"no configs/{group}/{option}.yaml; choose one of {', '.join(choices)}"
                    ) from e
            raise ConfigError("overrides", " ".join(overrides), str(e).splitlines()[0]) from e
        finally:
            GlobalHydra.instance().clear()
    return to_config(dcfg)


def slurm_dir(cfg: TrainConfig, root: str | None = None) -> str:
    return os.path.join(os.path.abspath(root or os.getcwd()), cfg.run_dir, "slurm")


def plan_training(cfg: TrainConfig, overrides: list[str], *, one_job: bool = False) -> list[Job]:
    """One job per stage, each after the previous one (or one job for the recipe, or for `only_stage`)."""
    directory = slurm_dir(cfg)
    if cfg.only_stage is not None or one_job or len(cfg.recipe.stages) == 1:
        part = cfg.only_stage or "recipe"
        return [
            Job(
                part=part,
                script=os.path.join(directory, f"{part}.sbatch"),
                text=render.render_train(cfg, overrides),
            )
        ]
    jobs, previous = [], None
    for stage in cfg.recipe.stages:
        jobs.append(
            Job(
                part=stage,
                script=os.path.join(directory, f"{stage}.sbatch"),
                text=render.render_train(cfg, overrides, stage=stage),
                after=previous,
            )
        )
        previous = stage
    return jobs


def plan_data_array(cfg: TrainConfig, overrides: list[str], *, num_shards: int) -> list[Job]:
    directory = slurm_dir(cfg)
    text = render.render_data_array(cfg, overrides, num_shards=num_shards)
    return [Job(part="data", script=os.path.join(directory, "data.sbatch"), text=text)]


def _slurm_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(
            f"{name} not found on PATH: run on a Slurm login node (or start the local test cluster, "
            "slurm/testing/start.sh); --dry-run prints the script without Slurm"
        )
    return path


def sbatch(script: str, *, dependency: str | None = None) -> str:
    """Submit `script`; returns the job id. SlurmError with sbatch's own error line when it refuses."""
    cmd = [_slurm_binary("sbatch"), "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    proc = subprocess.run([*cmd, script], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit code {proc.returncode}"]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        raise SlurmError(f"sbatch refused {script}: {errors[-1].strip()}")
    return proc.stdout.strip().split(";")[0]


def submit(jobs: list[Job], *, dry_run: bool = False) -> list[Job]:
    """Write each script into the run dir and submit them in order, chaining `after` (dry_run: neither)."""
    if not dry_run:
        _slurm_binary("sbatch")  # fail before writing or submitting anything
    if dry_run:
        return jobs
    ids: dict[str, str] = {}
    for job in jobs:
        os.makedirs(os.path.dirname(job.script), exist_ok=True)
        with open(job.script, "w") as f:
            f.write(job.text)
        try:
            job.job_id = sbatch(job.script, dependency=ids.get(job.after) if job.after else None)
        except SlurmError:
            for done in ids.values():  # a half-submitted chain would wait forever: take it back
                subprocess.run(["scancel", done], capture_output=True)
            raise
        ids[job.part] = job.job_id
    _record(os.path.dirname(jobs[0].script), jobs)
    return jobs


def _record(directory: str, jobs: list[Job]) -> None:
    path = os.path.join(directory, JOBS_FILE)
    history = read_jobs(directory)
    history.append(
        {
            "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
            "jobs": [{k: v for k, v in asdict(j).items() if k != "text"} for j in jobs],
        }
    )
    with open(path + ".tmp", "w") as f:
        json.dump(history, f, indent=1)
    os.replace(path + ".tmp", path)


def read_jobs(directory: str) -> list[dict]:
    """Every submission recorded for a run, oldest first."""
    path = os.path.join(directory, JOBS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)
