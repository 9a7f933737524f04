"""Shared fixtures: a small real data config and a helper that runs `python -m train` as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc: int = 2, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `script` with `args` under torchrun on `nproc` local gloo processes (one thread each, no rank
    variables inherited from the test process) and assert it succeeded."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def megatron_forward_backward(ddp, opt, tokens, *, forward_only: bool = False) -> float:
    """Zero the gradients and run megatron-core's forward-backward of a language model on `tokens` (batch,
    seq + 1: inputs and next-token labels) as one micro-batch; the mean loss."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape[0], tokens.shape[1] - 1

    def fwd(it, model):
        x = next(it)
        out = model(x[:, :-1], torch.arange(seq).expand(batch, -1), None, labels=x[:, 1:])
        return out, lambda o: (o.mean(), {"loss": o.mean().detach().clone()})

    ddp.zero_grad_buffer()
    opt.zero_grad()
    res = get_forward_backward_func()(
        forward_step_func=fwd,
        data_iterator=iter([tokens]),
        model=[ddp],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=forward_only,
    )
    return res[0]["loss"].item()


# A small but real run: the stdlib/package-docs corpus capped, a 2-layer model, short stages.
SMALL = [
    "data.sources.code.max_bytes=600000",
    "data.sources.docs.max_docs=400",
    "data.tokenizer.vocab_size=1024",
    "data.tokenizer.train_bytes=600000",
    "data.valid_percent=10",  # the first 600 kB of the stdlib are ~22 large files: 2% would hold out none
    "model.num_layers=2",
    "model.hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=352",
    "logging.wandb.mode=disabled",
    "logging.log_every_steps=1",
    "recipe.stages.base.eval_tokens=2048",
    "recipe.stages.long_context.eval_tokens=2048",
    "recipe.stages.anneal.eval_tokens=2048",
]


@pytest.fixture(scope="session")
def megatron_world1():
    """This test process as a world of one: gloo process group, megatron-core groups, CPU shims."""
    import torch

    from parallel import engine
    from parallel.layout import ParallelLayout

    device = torch.device("cpu")
    engine.init_distributed(device)
    engine.init_model_parallel(ParallelLayout(nproc_per_node=1), seed=1234, device=device)
    yield device
    engine.destroy()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One prepared-data cache shared by every run of the session (keyed by the data config's hash)."""
    return str(tmp_path_factory.mktemp("data_cache"))


def run_train(
    overrides: list[str], *, cwd: Path, timeout: int = 900, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m train` in a subprocess; `env` adds to (or, e.g. WANDB_MODE, replaces) its environment."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", HYDRA_FULL_ERROR="1") | (env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "train", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"python -m train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(records: list[dict], stage: str) -> dict[int, float]:
    """Training loss per step of a stage (a resumed run re-logs steps: the last record wins)."""
    return {r["step"]: r["loss"] for r in records if r["stage"] == stage and "loss" in r}
