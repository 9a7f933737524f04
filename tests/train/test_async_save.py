"""Async checkpoint save (checkpoint.async_save, megatron engine): the shards are written by a forked process
while training goes on, the checkpoint turns complete only once finalized, its content equals a synchronous
save's byte for byte, and a resume from it is exact."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from tests.train.test_checkpoint import build_parts, tiny_arch, train_step
from train import checkpoint
from train.checkpoint import CheckpointConfig


def dcp_metadata(path: str):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def complete_record(path: str) -> dict:
    with open(os.path.join(path, checkpoint.COMPLETE_FILE)) as f:
        return json.load(f)["files"]


def test_async_save_equals_sync_save_and_resumes_exactly(megatron_world1, tmp_path):
    arch = tiny_arch()
    ddp, opt, sched = build_parts(arch)
    for _ in range(2):
        train_step(ddp, opt)
        sched.step(150)
    state = {"step": 2, "tokens": 300, "final": False}
    parts = {"model": ddp.module, "optimizer": opt, "scheduler": sched, "state": state}
    sync_dir, async_dir = str(tmp_path / "sync"), str(tmp_path / "async")
    os.makedirs(sync_dir)
    os.makedirs(async_dir)
    sync_path = checkpoint.save(sync_dir, **parts)

    async_path = checkpoint.save(async_dir, retention=CheckpointConfig(async_save=True), **parts)
    # Not complete yet: no COMPLETE record, no rename, no `latest`, whatever the writer has done so far.
    assert checkpoint.latest(async_dir) is None and not os.path.exists(async_path)
    assert os.path.isdir(async_path + ".tmp")
    # Training goes on and changes weights and Adam moments while the checkpoint is pending...
    after = [train_step(ddp, opt) for _ in range(2)]
    checkpoint.wait_for_saves()
    assert checkpoint.latest(async_dir) == async_path and not os.path.exists(async_path + ".tmp")
    assert checkpoint.verify(async_path, full=True) is None
    # ...yet the checkpoint holds the state at save time: every file equals the synchronous save's.
    sync_files, async_files = complete_record(sync_path), complete_record(async_path)
    assert any(name.endswith(".distcp") for name in async_files)
    assert sorted(async_files) == sorted(sync_files)
    assert {k: v for k, v in async_files.items() if k != ".metadata"} == {
        k: v for k, v in sync_files.items() if k != ".metadata"
    }
    # torch DCP's .metadata also records the directory it was written to: equal but for that.
    sync_meta, async_meta = (dcp_metadata(p) for p in (sync_path, async_path))
    assert async_meta.storage_meta.checkpoint_id.endswith("async/step_000002.tmp")
    # Its storage_data lists the items in the order the writer threads finished them: compare them sorted.
    for meta in (sync_meta, async_meta):
        meta.storage_meta = None
        meta.storage_data = dict(sorted(meta.storage_data.items(), key=lambda item: repr(item[0])))
    assert pickle.dumps(async_meta) == pickle.dumps(sync_meta)

    torch.manual_seed(99)
    ddp2, opt2, sched2 = build_parts(arch)
    assert checkpoint.load(async_path, model=ddp2.module, optimizer=opt2, scheduler=sched2) == state
    assert sched2.num_steps == 300
    assert [train_step(ddp2, opt2) for _ in range(2)] == after  # exact resume


def test_deepspeed_refuses_async_save():
    from tests.train.test_config import compose_cfg
    from train.config import to_config
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.async_save=True: .*parallel.engine=deepspeed"):
        to_config(compose_cfg(["parallel=deepspeed_zero1", "checkpoint.async_save=true"]))
    assert to_config(compose_cfg(["checkpoint.async_save=true"])).checkpoint.async_save
