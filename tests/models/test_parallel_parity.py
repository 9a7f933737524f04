"""TP=2, TP=2+SP and EP=2 (MoE) on 2 gloo processes equal `transformers` (hence TP=1): logits, loss and every
gradient, for every family (tests/models/dist_parity.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "tests/models/dist_parity.py",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_every_family_and_layout_ran(results):
    families = {name.split(":")[0] for name in results}
    assert families == {"llama3", "mistral", "mixtral", "qwen2", "gemma2", "deepseek_v2"}
    assert {"mixtral:ep2", "deepseek_v2:ep2", "llama3:tp2,sp1", "deepseek_v2:tp2,sp1"} <= set(results)


@pytest.mark.parametrize("quantity", ["logits", "loss", "grads", "expert_grads"])
def test_parallel_equals_reference(results, quantity):
    worst = {name: r[quantity] for name, r in results.items()}
    assert max(worst.values()) <= TOL, worst
