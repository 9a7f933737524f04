"""Checkpoint averaging (weights only) of the last K checkpoints of a stage, as Llama 3 does at the end of
annealing ("we average the model checkpoints during annealing", Dubey et al. 2024, Sec. 3.4.3).

Each rank loads its own shards of every checkpoint into the model and keeps a float64 running sum of its
floating-point tensors, so averaging works at any layout the checkpoints load at and never holds more than
one extra copy of the rank's weights.
"""

from __future__ import annotations

import logging

import torch

from train import checkpoint

log = logging.getLogger(__name__)


def average_into(engine, paths: list[str], *, full_verify: bool = False) -> None:
    """Set the weights of `engine` (parallel/engines/, or a `checkpoint.MegatronState`) to the element-wise
    mean of the checkpoints at `paths`, each loaded weights-only by `checkpoint.load` (which refuses a broken
    one). Non-float entries (extra state) keep the last checkpoint's value."""
    if not paths:
        raise ValueError("average_into needs at least one checkpoint")
    sums: list[dict[str, torch.Tensor]] = [{} for _ in engine.modules]
    for path in paths:
        checkpoint.load(path, engine=engine, load_optimizer=False, full_verify=full_verify)
        for module, acc in zip(engine.modules, sums, strict=True):
            for name, value in module.state_dict().items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    acc.setdefault(name, torch.zeros_like(value, dtype=torch.float64)).add_(value.double())
    for module, acc in zip(engine.modules, sums, strict=True):
        state = module.state_dict()
        for name, total in acc.items():
            state[name] = (total / len(paths)).to(state[name].dtype)
        module.load_state_dict(state)
    log.info("averaged %d checkpoints: %s", len(paths), ", ".join(paths))


def last_checkpoints(directory: str, k: int) -> list[str]:
    """The last `k` complete checkpoints of a stage directory, oldest first."""
    found = checkpoint.complete_checkpoints(directory)
    if len(found) < k:
        raise ValueError(
            f"averaging needs {k} complete checkpoints in {directory}, found {len(found)}: "
            "save more often (save_every_tokens) or keep more (checkpoint.keep_last)"
        )
    return found[-k:]
