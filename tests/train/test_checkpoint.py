"""Checkpoints: the COMPLETE record, fallback past broken checkpoints, retention, and a real megatron save/load."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import megatron_forward_backward
from train import checkpoint
from train.checkpoint import CheckpointConfig


def fake_checkpoint(directory, step: int, *, tokens: int, final: bool = False, complete: bool = True) -> str:
    """A checkpoint directory with two shard files, its loop state and (unless cut off) its COMPLETE record."""
    path = checkpoint.path_for(str(directory), step)
    os.makedirs(os.path.join(path, "model"))
    with open(os.path.join(path, "model", "__0_0.distcp"), "wb") as f:
        f.write(os.urandom(1000 + step))
    with open(os.path.join(path, "common.pt"), "wb") as f:
        f.write(b"x" * 10)
    with open(os.path.join(path, checkpoint.STATE_FILE), "w") as f:
        json.dump({"step": step, "tokens": tokens, "final": final}, f)
    if complete:
        checkpoint.write_complete(path, checkpoint.hash_files(path, checkpoint._files(path)))
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write(os.path.basename(path))
    return path


def test_complete_record_lists_every_file_with_size_and_hash(tmp_path):
    path = fake_checkpoint(tmp_path, 10, tokens=100)
    with open(os.path.join(path, checkpoint.COMPLETE_FILE)) as f:
        record = json.load(f)
    assert sorted(record["files"]) == ["common.pt", "kiln.json", "model/__0_0.distcp"]
    assert record["files"]["common.pt"][0] == 10
    assert len(record["digest"]) == 64
    assert checkpoint.verify(path) is None and checkpoint.verify(path, full=True) is None


def test_truncated_shard_falls_back_to_previous_checkpoint(tmp_path, caplog):
    good = fake_checkpoint(tmp_path, 10, tokens=100)
    bad = fake_checkpoint(tmp_path, 20, tokens=200)
    shard = os.path.join(bad, "model", "__0_0.distcp")
    os.truncate(shard, 500)
    assert "1020 when saved" in checkpoint.verify(bad)
    with caplog.at_level("WARNING"):
        assert checkpoint.latest(str(tmp_path)) == good
    assert "not usable" in caplog.text and "__0_0.distcp: 500 bytes" in caplog.text


def test_same_size_corruption_is_caught_by_the_full_check_only(tmp_path):
    path = fake_checkpoint(tmp_path, 10, tokens=100)
    with open(os.path.join(path, "common.pt"), "r+b") as f:
        f.write(b"y")
    assert checkpoint.verify(path) is None
    assert "content differs" in checkpoint.verify(path, full=True)


def test_save_cut_off_before_complete_is_never_used(tmp_path, caplog):
    good = fake_checkpoint(tmp_path, 10, tokens=100)
    fake_checkpoint(tmp_path, 20, tokens=200, complete=False)  # killed after writing, before COMPLETE
    os.makedirs(tmp_path / "step_000030.tmp")  # killed mid-write
    os.makedirs(tmp_path / "step_000005.tmp")  # older than the resume point: not worth a warning
    with caplog.at_level("WARNING"):
        assert checkpoint.latest(str(tmp_path)) == good
    unfinished = [r.getMessage() for r in caplog.records if "unfinished save" in r.getMessage()]
    assert len(unfinished) == 1 and "step_000030.tmp: no COMPLETE record" in unfinished[0]
    assert unfinished[0].endswith("resuming from " + good)


def test_missing_latest_pointer_finds_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 10, tokens=100)
    newest = fake_checkpoint(tmp_path, 20, tokens=200)
    os.remove(tmp_path / "latest")
    assert checkpoint.latest(str(tmp_path)) == newest
    assert checkpoint.latest(str(tmp_path / "nothing_here")) is None


def test_retention_keeps_last_k_final_and_every_m_tokens(tmp_path):
    paths = {
        s: fake_checkpoint(tmp_path, s, tokens=s * 100, final=(s == 60)) for s in (10, 20, 30, 40, 50, 60)
    }
    os.makedirs(tmp_path / "step_000070.tmp")
    removed = checkpoint.prune(
        str(tmp_path), CheckpointConfig(keep_last=2, keep_every_tokens=2000), keep=paths[60]
    )
    kept = sorted(p for p in os.listdir(tmp_path) if p.startswith("step_"))
    # newest two (50, 60; 60 is also final), multiples of 2000 tokens (20, 40); 10 and 30 and the .tmp go.
    assert kept == ["step_000020", "step_000040", "step_000050", "step_000060"]
    assert sorted(os.path.basename(p) for p in removed) == ["step_000010", "step_000030", "step_000070.tmp"]


@pytest.mark.parametrize(("key", "value"), [("keep_last", 0), ("keep_every_tokens", -5)])
def test_bad_retention_is_a_config_error(key, value):
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match=f"checkpoint.{key}={value}"):
        CheckpointConfig(**{key: value})


def build_parts(arch, *, lr: float = 1e-2, zero_stage: int = 1):
    """A world-of-one megatron model, optimizer and schedule, as the loop builds them."""
    from models.gpt import build_model
    from parallel import engine
    from parallel.layout import ParallelLayout
    from train.schedule import build_scheduler

    layout = ParallelLayout(nproc_per_node=1, micro_batch=2, zero_stage=zero_stage)
    ddp = engine.wrap_ddp(build_model(arch, vocab_size=256, max_seq_length=16), layout)
    engine.configure_schedule_hooks(ddp)
    opt = engine.build_optimizer(
        ddp,
        layout=layout,
        lr=lr,
        min_lr=0.0,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        eps=1e-8,
        clip_grad=1.0,
        bf16=False,
    )
    sched = build_scheduler(opt, peak_lr=lr, min_lr=0.0, tokens=1000, warmup_tokens=0, schedule="cosine")
    return ddp, opt, sched


def tiny_arch():
    from models.registry import resolve_arch

    return resolve_arch("llama3", "tiny", num_layers=1, hidden_size=64, num_attention_heads=4, num_kv_heads=2)


TOKENS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def train_step(ddp, opt) -> float:
    """One megatron-core step of the tiny model on TOKENS (batch 2, sequence 16); the loss."""
    loss = megatron_forward_backward(ddp, opt, TOKENS)
    opt.step()
    return loss


@pytest.mark.parametrize("zero_stage", [1, 0])  # distributed optimizer; plain (configs/parallel/single.yaml)
def test_megatron_save_is_complete_and_loads_back_exactly(megatron_world1, tmp_path, zero_stage):
    arch = tiny_arch()

    def build():
        return build_parts(arch, zero_stage=zero_stage)

    ddp, opt, sched = build()
    for _ in range(2):
        train_step(ddp, opt)
        sched.step(150)
    directory = str(tmp_path / "ckpt")
    os.makedirs(directory)
    state = {"step": 3, "tokens": 300, "final": False}
    path = checkpoint.save(directory, model=ddp.module, optimizer=opt, scheduler=sched, state=state)
    assert checkpoint.latest(directory) == path and checkpoint.verify(path, full=True) is None
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]

    torch.manual_seed(99)
    ddp2, opt2, sched2 = build()
    assert (
        checkpoint.load(path, model=ddp2.module, optimizer=opt2, scheduler=sched2, full_verify=True) == state
    )
    for (n, a), (_, b) in zip(ddp.module.state_dict().items(), ddp2.module.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
    assert sched2.num_steps == 300
    # Exact resume: the next steps from the loaded state (weights and Adam moments) equal the original's.
    resumed = [train_step(ddp2, opt2) for _ in range(2)]
    assert resumed == [train_step(ddp, opt) for _ in range(2)]

    shard = next(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(".distcp"))
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(RuntimeError, match="refusing to load a broken checkpoint: .*truncated"):
        checkpoint.load(path, model=ddp2.module)


def test_average_of_checkpoints_is_the_elementwise_mean(megatron_world1, tmp_path):
    from train.average import average_into, last_checkpoints

    directory = str(tmp_path / "ckpt")
    os.makedirs(directory)
    ddp, opt, sched = build_parts(tiny_arch())
    for inner in opt.chained_optimizers:  # a saved optimizer has stepped at least once
        inner._init_optimizer_states_with_dummy_values()
    saved = []
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in ddp.module.parameters():
                p.normal_()
        saved.append(
            {k: v.clone() for k, v in ddp.module.state_dict().items() if isinstance(v, torch.Tensor)}
        )
        checkpoint.save(
            directory, model=ddp.module, optimizer=opt, scheduler=sched, state={"step": step, "tokens": step}
        )
    paths = last_checkpoints(directory, 2)
    assert [checkpoint.read_state(p)["step"] for p in paths] == [2, 3]
    average_into(checkpoint.MegatronState([ddp.module]), paths)
    for name, value in ddp.module.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, (saved[1][name] + saved[2][name]) / 2, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs 4 complete checkpoints in .* found 3"):
        last_checkpoints(directory, 4)


def _saved_with(tmp_path, overrides: list[str], stage: str = "base") -> str:
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    path = tmp_path / "step_000010"
    path.mkdir()
    record = checkpoint.resume_record(to_config(compose_cfg(overrides)), stage)
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(record))
    return str(path)


def _current(overrides: list[str], stage: str = "base") -> dict:
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    return checkpoint.resume_record(to_config(compose_cfg(overrides)), stage)


def test_resume_refuses_a_changed_lr_unless_allowed(tmp_path, caplog):
    from train.errors import ConfigError

    path = _saved_with(tmp_path, [])
    checkpoint.check_resume(path, _current(["parallel.micro_batch=1", "logging.log_every_steps=3"]), allow=[])
    changed = _current(["recipe.stages.base.lr=0.001"])
    with pytest.raises(ConfigError) as err:
        checkpoint.check_resume(path, changed, allow=[])
    msg = str(err.value)
    assert "recipe.stages.base.lr: 0.003 -> 0.001" in msg
    assert "resume.allow_config_change=[recipe.stages.base.lr]" in msg
    with caplog.at_level("WARNING"):
        checkpoint.check_resume(path, changed, allow=["recipe.stages.base"])
    assert "recipe.stages.base.lr changed 0.003 -> 0.001 (allowed)" in caplog.text
    # Another stage's settings do not concern this stage's checkpoint.
    checkpoint.check_resume(path, _current(["recipe.stages.anneal.tokens=131072"]), allow=[])


def test_resume_refuses_another_architecture_even_when_allowed(tmp_path):
    from train.errors import ConfigError

    path = _saved_with(tmp_path, [])
    with pytest.raises(ConfigError, match="another architecture \\(arch.num_layers: 4 -> 3\\)"):
        checkpoint.check_resume(path, _current(["model.num_layers=3"]), allow=["arch"])
    with pytest.raises(ConfigError, match="data.tokenizer.vocab_size: 4096 -> 2048"):
        checkpoint.check_resume(path, _current(["data.tokenizer.vocab_size=2048"]), allow=["data"])
