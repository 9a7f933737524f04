"""Checkpoints with megatron.core.dist_checkpointing: model, optimizer, LR schedule and the loop state
(step, tokens seen, the LR, RNG). Layout:

    <run_dir>/checkpoints/<stage>/step_000120/    one complete checkpoint (renamed into place when written)
    <run_dir>/checkpoints/<stage>/latest          the name of the newest complete checkpoint
    <run_dir>/checkpoints/<stage>/step_*/kiln.json  the loop state, readable without torch

A checkpoint is written to `step_N.tmp` and renamed only after every rank finished, so `latest` never
points at a partial one; a stage is done when its latest checkpoint says `"final": true`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}  # reshardable across DP/TP sizes
STATE_FILE = "kiln.json"


def stage_dir(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, "checkpoints", stage)


def latest(directory: str) -> str | None:
    """The newest complete checkpoint in a stage directory, or None."""
    pointer = os.path.join(directory, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(directory, f.read().strip())
    return path if os.path.exists(os.path.join(path, STATE_FILE)) else None


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:06d}")


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def save(directory: str, *, model, optimizer, scheduler, state: dict) -> str:
    """Save on all ranks; returns the checkpoint path. `model` is the bare GPTModel (DDP's `.module`),
    `state` the JSON-able loop state."""
    from megatron.core import dist_checkpointing

    path = path_for(directory, state["step"])
    tmp = path + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd = model.sharded_state_dict()
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    dist_checkpointing.save(sharded, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        with open(os.path.join(directory, "latest.tmp"), "w") as f:
            f.write(os.path.basename(path))
        os.replace(os.path.join(directory, "latest.tmp"), os.path.join(directory, "latest"))
    dist.barrier()
    log.info("saved checkpoint %s", path)
    return path


def load(path: str, *, model, optimizer=None, scheduler=None) -> dict:
    """Load weights (and, when given, optimizer and schedule state) from `path`; returns its loop state."""
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    sharded: dict = {"model": model_sd}
    if optimizer is not None:
        # A fresh distributed optimizer has no Adam state yet: allocate it so the checkpoint has a target.
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            opt._init_optimizer_states_with_dummy_values()
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT
        )
    loaded = dist_checkpointing.load(sharded, path)
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        common = dist_checkpointing.load_common_state_dict(path)
        scheduler.load_state_dict(common["scheduler"])
        torch.set_rng_state(common["rng"])
    return read_state(path)
