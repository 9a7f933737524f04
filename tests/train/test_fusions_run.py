"""`python -m train` with `model.fusion.*` (models/fusions.py) through the real loop and the megatron engine: the
same per-step losses as the plain path (fp32 CPU; 1e-6 rel fused, 5e-5 with torch.compile per layer).

The three runs are one `python -m train --multirun` (Hydra's basic launcher: one job after another in one process),
so the interpreter, megatron-core and the compiled megatron fusions are loaded once, not three times."""

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
    # No passkey probe: these tests compare training losses, and with the compiled kernels its batch-of-one
    # prompts at 256 and 1024 tokens recompile them.
    "recipe.stages.base.passkey_contexts=[]",
]
PLAIN = {"norm": "false", "activation": "false", "cross_entropy": "false", "compile": "false"}
FUSED = dict(norm="true", activation="true", cross_entropy="true")
CASES = {"plain": PLAIN, "fused": PLAIN | FUSED, "compiled": PLAIN | FUSED | {"compile": "true"}}


@pytest.fixture(scope="module")
def losses(tmp_path_factory, data_cache) -> dict[str, list[float]]:
    """Each case's per-step training losses; the jobs run in CASES' order (job.num 0, 1, 2)."""
    sweep = tmp_path_factory.mktemp("fusions")
    choices = ",".join("{" + ",".join(f"{k}:{v}" for k, v in case.items()) + "}" for case in CASES.values())
    proc = run_train(
        [
            "--multirun",
            *RUN,
            f"model.fusion=choice({choices})",
            f"hydra.sweep.dir={sweep}",
            f"run_dir={sweep}/" + "${hydra:job.num}",
            f"data.cache_dir={data_cache}",
        ],
        cwd=ROOT,
    )
    out = {}
    for num, (name, case) in enumerate(CASES.items()):
        run_dir = sweep / str(num)
        picked = Fusions(**{k: v == "true" for k, v in case.items()})
        assert (
            f"base kernels: {picked}" in (run_dir / "logs" / "rank0.log").read_text()
        )  # what the loop built
        assert f"base kernels: {picked}" in proc.stderr + proc.stdout
        per_step = train_losses(read_metrics(run_dir), "base")
        out[name] = [per_step[s] for s in sorted(per_step)]
    return out


@pytest.mark.parametrize(("name", "tol"), [("fused", 1e-6), ("compiled", 5e-5)])
def test_fused_run_has_the_plain_losses(name, tol, losses):
    plain, got = losses["plain"], losses[name]
    print(f"plain {plain}\n{name} {got}")
    assert len(plain) == 4 and len(got) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(got, plain)) <= tol
