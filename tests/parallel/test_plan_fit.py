"""Fitting recovers the constants synthetic sweeps were generated with (noise added)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parallel.plan.fit import Point, fit, fit_parametric, isoflop_fits, main
from parallel.plan.laws import EPOCH
from train.errors import ConfigError

BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21]


def synthetic(law=EPOCH, *, noise=0.003, seed=0, budgets=BUDGETS, per_budget=9) -> list[Point]:
    """IsoFLOP sweeps around the law's own optimum (x/÷ 8), losses x (1 + N(0, noise))."""
    rng = np.random.default_rng(seed)
    points = []
    for c in budgets:
        n_star, _ = law.optimal(c)
        for n in n_star * np.logspace(-0.9, 0.9, per_budget):
            d = c / (6 * n)
            points.append(Point(n, d, c, law.loss(n, d) * (1 + noise * rng.standard_normal())))
    return points


def test_isoflop_minima_and_power_laws_recover_the_generating_law():
    f = fit(synthetic())
    for curve in f.isoflops:
        n_star, d_star = EPOCH.optimal(curve.flops)
        assert curve.n_opt == pytest.approx(n_star, rel=0.15)  # one parabola, 9 noisy points
    # Through all budgets: the exponents beta/(a+b) = 0.5126 and alpha/(a+b) = 0.4874 (Epoch refit).
    a, b = EPOCH.alpha, EPOCH.beta
    assert f.n_opt.exponent == pytest.approx(b / (a + b), rel=0.05)
    assert f.d_opt.exponent == pytest.approx(a / (a + b), rel=0.05)
    mid = 1e20
    assert f.n_opt(mid) == pytest.approx(EPOCH.optimal(mid)[0], rel=0.05)
    assert f.n_opt.exponent + f.d_opt.exponent == pytest.approx(1.0, abs=1e-9)  # D* = C / (6 N*)


def test_parametric_huber_fit_recovers_constants():
    law, huber = fit_parametric(synthetic(noise=0.002, seed=1))
    assert law.alpha == pytest.approx(EPOCH.alpha, rel=0.05)
    assert law.beta == pytest.approx(EPOCH.beta, rel=0.05)
    assert abs(law.E / EPOCH.E - 1) < 0.05
    # A and B trade off with the exponents; the law's predictions are what must agree.
    for c in (1e19, 1e22):
        assert law.optimal(c)[0] == pytest.approx(EPOCH.optimal(c)[0], rel=0.1)
    assert huber < 1e-3


def test_noise_free_fit_is_exact():
    law, _ = fit_parametric(synthetic(noise=0.0))
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, k) == pytest.approx(getattr(EPOCH, k), rel=0.01), k


def test_too_few_points_is_a_clear_error():
    with pytest.raises(
        ConfigError, match=r"fit.runs=6: need >= 3 runs bracketing the optimum at each of >= 2"
    ):
        fit(synthetic(budgets=[1e18], per_budget=5) + synthetic(budgets=[1e20], per_budget=1))
    with pytest.raises(ConfigError, match="fit.runs=4: the parametric L"):
        fit_parametric(synthetic(budgets=[1e18], per_budget=4))
    assert isoflop_fits(synthetic(budgets=[1e18], per_budget=2)) == []


def test_cli_writes_json_and_png(tmp_path, capsys):
    for i, p in enumerate(synthetic(budgets=[1e18, 1e19, 1e20], per_budget=5)):
        run = tmp_path / f"run{i}"
        run.mkdir()
        record = {"n_params": p.n_params, "tokens": p.tokens, "flops_6nd": 6 * p.n_params * p.tokens,
                  "budget": p.flops, "loss": p.loss}  # fmt: skip
        (run / "scaling.json").write_text(json.dumps(record))
    assert main([str(tmp_path)]) == 0
    out = json.loads((tmp_path / "fit.json").read_text())
    assert out["runs"] == 15 and len(out["isoflops"]) == 3 and out["parametric"]["alpha"] > 0
    assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "N*(C) =" in capsys.readouterr().out
    assert main([str(tmp_path / "run0")]) == 2  # one run: not enough
