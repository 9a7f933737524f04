"""Process-group set-up."""

from __future__ import annotations

import os

import torch.distributed as dist


def test_world_of_one_leaves_no_torchrun_variables_for_children(megatron_world1):
    # A child `python -m train` would take LOCAL_RANK for "under torchrun" and reuse a taken MASTER_PORT.
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"} & set(os.environ)
