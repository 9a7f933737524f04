"""`python -m train` with `model.fusion.*` (models/fusions.py) through the real loop and the megatron engine: the
same per-step losses as the plain path (fp32 CPU; 1e-6 rel fused, 5e-5 with torch.compile per layer)."""

from __future__ import annotations

import pytest

from models.fusions import Fusions
from tests.conftest import ROOT, SMALL, read_metrics, run_train, train_losses

RUN = SMALL + [
    "parallel=single",
    "parallel.micro_batch=2",
    "only_stage=base",
    "recipe.stages.base.tokens=8192",  # 4 steps of 8 sequences x 256 tokens
    "recipe.stages.base.batch_tokens=2048",
    "recipe.stages.base.warmup_tokens=0",
]
PLAIN = {"norm": "false", "activation": "false", "cross_entropy": "false", "compile": "false"}


def _losses(tmp_path, data_cache, name: str, **fusion: str) -> list[float]:
    run_dir = tmp_path / name
    settings = [f"model.fusion.{k}={v}" for k, v in (PLAIN | fusion).items()]
    proc = run_train([*RUN, *settings, f"run_dir={run_dir}", f"data.cache_dir={data_cache}"], cwd=ROOT)
    picked = {k: (PLAIN | fusion)[k] == "true" for k in PLAIN}
    assert f"base kernels: {Fusions(**picked)}" in proc.stderr + proc.stdout  # what the loop built
    losses = train_losses(read_metrics(run_dir), "base")
    return [losses[s] for s in sorted(losses)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data_cache) -> list[float]:
    return _losses(tmp_path_factory.mktemp("plain"), data_cache, "run")


@pytest.mark.parametrize(
    ("name", "fusion", "tol"),
    [
        ("fused", dict(norm="true", activation="true", cross_entropy="true"), 1e-6),
        ("compiled", dict(norm="true", activation="true", cross_entropy="true", compile="true"), 5e-5),
    ],
)
def test_fused_run_has_the_plain_losses(name, fusion, tol, plain, tmp_path_factory, data_cache):
    got = _losses(tmp_path_factory.mktemp(name), data_cache, "run", **fusion)
    print(f"plain {plain}\n{name} {got}")
    assert len(plain) == 4 and len(got) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(got, plain)) <= tol
