"""The fused kernels at TP=2 and TP=2+SP on 2 gloo processes equal the plain path at the same layout (loss and
every gradient, 1e-6 of each tensor's largest entry), and the vocab-parallel fused cross-entropy equals
F.cross_entropy on the whole logits (tests/models/dist_fusions.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import torchrun

pytestmark = pytest.mark.slow
EXACT = 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusions_tp") / "results.json"
    torchrun("tests/models/dist_fusions.py", out)
    return json.loads(out.read_text())


def test_every_case_ran_fused(results):
    assert {"cross_entropy:tp2", "llama3:tp2", "llama3:tp2,sp", "gemma2:tp2,sp", "mixtral:tp2,sp"} <= set(
        results
    )
    assert all(r["fused_ran"] == 1.0 for r in results.values())


@pytest.mark.parametrize("quantity", ["loss", "grads"])
def test_fused_equals_plain_at_tp2(results, quantity):
    worst = {name: r[quantity] for name, r in results.items()}
    print(worst)
    assert max(worst.values()) <= EXACT, worst
