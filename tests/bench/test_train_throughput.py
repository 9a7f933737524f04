"""Smoke test of bench/train_throughput.py: one command measures Kiln and both references and writes a trace.
Numbers are checked for sense (all three train the same model from the same starting loss), never for speed."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # ~40 s: one subprocess importing megatron-core and transformers


def test_bench_measures_every_implementation_and_profiles(tmp_path):
    out, trace = tmp_path / "rows.json", tmp_path / "trace"
    cmd = [sys.executable, "bench/train_throughput.py", "--seq", "32,64", "--batch-tokens", "128"]
    cmd += ["--steps", "2", "--warmup", "1", "--size", "debug", "--vocab", "256"]
    cmd += ["--json", str(out), "--profile", str(trace), "--profile-steps", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {(r["seq"], r["impl"]) for r in rows} == {
        (s, i) for s in (32, 64) for i in ("kiln", "transformers", "plain")
    }
    for r in rows:
        assert r["batch"] == 128 // r["seq"] and len(r["times"]) == 2
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / statistics.median(r["times"]))
        # Same architecture, same init scale: every implementation starts near the uniform loss ln(vocab).
        assert abs(r["loss"] - math.log(256)) < 0.3, r
    assert "| 64 | 2 | kiln |" in proc.stdout and "vs transformers" in proc.stdout
    assert (trace / "kiln_seq32.json").stat().st_size > 0 and "aten::mm" in proc.stdout


def test_bench_kiln_fusion_rows_train_the_same_model(tmp_path):
    """kiln-plain, kiln-fused and kiln-compiled (model.fusion settings) run the same steps to the same loss."""
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        "bench/train_throughput.py",
        "--seq",
        "32",
        "--batch-tokens",
        "128",
        "--steps",
        "2",
    ]
    cmd += ["--warmup", "1", "--size", "debug", "--vocab", "256", "--json", str(out)]
    cmd += ["--impls", "kiln-plain,kiln-fused,kiln-compiled"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loss = {r["impl"]: r["loss"] for r in json.loads(out.read_text())}
    assert abs(loss["kiln-plain"] - math.log(256)) < 0.3
    assert loss["kiln-fused"] == pytest.approx(loss["kiln-plain"], rel=1e-6)
    assert loss["kiln-compiled"] == pytest.approx(loss["kiln-plain"], rel=5e-5)
