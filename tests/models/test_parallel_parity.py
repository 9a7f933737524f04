"""TP=2, TP=2+SP and EP=2 (MoE) on 2 gloo processes equal `transformers` (hence TP=1): logits, loss and every
gradient, for every family (tests/models/dist_parity.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import torchrun

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "results.json"
    torchrun("tests/models/dist_parity.py", out)
    return json.loads(out.read_text())


def test_every_family_and_layout_ran(results):
    families = {name.split(":")[0] for name in results}
    assert families == {"llama3", "mistral", "mixtral", "qwen2", "gemma2", "deepseek_v2"}
    assert {"mixtral:ep2", "deepseek_v2:ep2", "llama3:tp2,sp1", "deepseek_v2:tp2,sp1"} <= set(results)


@pytest.mark.parametrize("quantity", ["logits", "loss", "grads", "expert_grads"])
def test_parallel_equals_reference(results, quantity):
    worst = {name: r[quantity] for name, r in results.items()}
    assert max(worst.values()) <= TOL, worst
