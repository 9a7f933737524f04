"""`python -m train [overrides]`: the Kiln Hydra app.

Composes and validates the whole config before anything else happens. Then:
- under torchrun (or Slurm's srun torchrun), or with a world of one: runs this rank;
- otherwise: prepares the data once in this process, then starts
  `torchrun --standalone --nproc_per_node=<parallel.nproc_per_node> -m train <same overrides>`.
Exit status: 0 done, 2 config or data refused, 3 stopped on a bad step (train/stability.py), 75 stopped on
request with a checkpoint (train/signals.py; the ranks' own status, torchrun reports 1), else a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train import faults
from train.config import register, to_config
from train.errors import ConfigError
from train.stability import DIVERGED_EXIT_CODE, DIVERGED_FILE

register()


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launch(cfg, overrides: list[str]) -> int:
    """Prepare the data once, then start one process per rank with the same overrides."""
    import logging

    from data.prepare import prepare_data
    from train.logs import setup_logging

    setup_logging(rank=0, level=cfg.logging.level)
    prepare_data(cfg.data)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.parallel.nproc_per_node}",
        f"--max-restarts={cfg.parallel.max_restarts}",
        "-m",
        "train",
        *overrides,
    ]
    logging.getLogger("train").info("launching: %s", " ".join(cmd))
    env = dict(os.environ, KILN_LAUNCH=uuid.uuid4().hex)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.parallel.nproc_per_node)))
    diverged = os.path.join(cfg.run_dir, DIVERGED_FILE)  # torchrun exits 1 whatever its ranks' status
    if os.path.exists(diverged):
        os.remove(diverged)
    code = subprocess.call(cmd, env=env)
    faults.kill_leftovers({"KILN_LAUNCH": env["KILN_LAUNCH"]})  # of ranks that died (SIGKILL, OOM killer)
    if code and os.path.exists(diverged):
        with open(diverged) as f:
            print(f"kiln: diverged: {f.read().strip()}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    return code


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        if os.environ.get(faults.FAULT_ENV):
            faults.parse(os.environ[faults.FAULT_ENV])
        if not _under_torchrun() and cfg.parallel.nnodes > 1:
            raise ConfigError(
                "parallel.nnodes",
                cfg.parallel.nnodes,
                "multi-node runs start torchrun on every node (srun torchrun ... -m train); "
                "launch them through Slurm or set nnodes=1",
            )
    except ConfigError as e:
        _refuse(e, "config")
    try:
        if _under_torchrun() or cfg.parallel.world_size == 1:
            from train.run import run

            run(cfg)
            return
        code = launch(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as e:  # found while preparing the data, before any training starts
        _refuse(e, "data")
    if code:
        sys.exit(code)


def _refuse(error: ConfigError, what: str) -> None:
    print(f"kiln: invalid {what}: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
