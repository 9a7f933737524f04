"""Fault injection for the fault drills (tests/train/test_fault_drills.py): SIGKILL one rank at a chosen point.

`KILN_FAULT=<point>:<rank>:<step>` kills global rank `<rank>` with SIGKILL (no handler, no cleanup, as the OOM
killer or a lost node would) at `<point>` of step `<step>`:

- `step`: mid-step, after forward/backward and before the optimizer update;
- `save`: inside the checkpoint save of step `<step>`, after this rank's shard files are written and before the
  COMPLETE record and the rename (a checkpoint cut off mid-write).

It fires in the first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset), so the workers torchrun restarts
(`parallel.max_restarts`) run through. Unset (the default), `inject` is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

import torch.distributed as dist

from train.errors import ConfigError

log = logging.getLogger(__name__)

FAULT_ENV = "KILN_FAULT"
POINTS = ("step", "save")


def parse(spec: str) -> tuple[str, int, int]:
    """(point, rank, step) of a KILN_FAULT value; a ConfigError naming the variable when malformed."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in POINTS or not all(p.isdigit() for p in parts[1:]):
        raise ConfigError(
            FAULT_ENV, spec, f"use <point>:<rank>:<step> with point one of {', '.join(POINTS)}, e.g. step:1:7"
        )
    return parts[0], int(parts[1]), int(parts[2])


def inject(point: str, step: int) -> None:
    """SIGKILL this process when KILN_FAULT names this point, rank and step (first attempt only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if parse(spec) != (point, dist.get_rank(), step):
        return
    log.warning(
        "fault injection (%s=%s): SIGKILL rank %d at %s of step %d",
        FAULT_ENV,
        spec,
        dist.get_rank(),
        point,
        step,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_leftovers(env: dict[str, str], *, older_attempts: bool = False) -> list[int]:
    """SIGKILL every other process whose environment has all of `env` (with `older_attempts`, only those of an
    earlier torchrun attempt); returns their pids. A rank killed with SIGKILL leaves its children running:
    megatron-core's checkpoint writers (forked) and their spawned result-queue manager. torchrun kills only the
    process groups of workers still alive, so these would write into a save the restarted run makes, and hold
    the launcher's stdout/stderr open after it ended."""
    import psutil

    mine = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    killed = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            penv = proc.environ()
            if any(penv.get(k) != v for k, v in env.items()):
                continue
            if older_attempts and int(penv.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) >= mine:
                continue
            proc.kill()
            killed.append(proc.pid)
        except (psutil.Error, ValueError):
            continue  # gone meanwhile, or not ours to read
    if killed:
        log.warning(
            "killed %d leftover process(es) of a killed rank (checkpoint writers): %s", len(killed), killed
        )
    return killed
