"""Fit your own scaling law from a sweep: `python -m parallel.plan.fit <sweep dir> [--out DIR]`.

Reads every `scaling.json` under the directory (train/run.py writes one per run: N, D, C, final loss) and fits
- IsoFLOP parabolas: per budget C, loss as a quadratic in log N; its minimum is N*(C), D*(C) = C / (6 N*)
  (Hoffmann et al. 2022, approach 2; Dubey et al. 2024, Sec. 3.2.1 fits the same parabolas in log D),
- power laws N*(C) = a C^b and D*(C) = A C^alpha through the minima (least squares in log-log; Llama 3's method),
- the parametric L(N, D) = E + A/N^alpha + B/D^beta by minimizing the Huber loss (delta = 1e-3) of
  log L_hat - log L with L-BFGS, L_hat = LSE(a - alpha log N, b - beta log D, e) (Hoffmann et al. approach 3,
  Appendix D.2). Initial points: a grid over (alpha, beta) with (E, A, B) solved linearly, the best few refined.
Writes fit.json (read by the planner: plan.fitted_law=<dir>/fit.json) and fit.png (matplotlib).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

from parallel.plan.laws import ParametricLaw, PowerLaw, fit_power_law
from parallel.plan.sweep import RECORD
from train.errors import ConfigError

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, Sec. 3.3


@dataclass(frozen=True)
class Point:
    n_params: float
    tokens: float
    flops: float
    loss: float


@dataclass(frozen=True)
class IsoFlop:
    flops: float
    n_opt: float
    d_opt: float
    loss_min: float
    coeffs: tuple[float, float, float]
    """Loss = c0 x^2 + c1 x + c2 with x = ln N."""
    points: int


@dataclass(frozen=True)
class Fit:
    isoflops: list[IsoFlop]
    n_opt: PowerLaw
    d_opt: PowerLaw
    parametric: ParametricLaw | None
    huber: float | None
    runs: int


def load_sweep(directory: str) -> list[Point]:
    points = []
    for path in sorted(glob.glob(os.path.join(directory, "**", RECORD), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        flops = r.get("budget") or r["flops_6nd"]
        points.append(Point(float(r["n_params"]), float(r["tokens"]), float(flops), float(r["loss"])))
    return points


def group_by_budget(points: list[Point], *, rel: float = 0.05) -> dict[float, list[Point]]:
    """Runs whose budgets agree within `rel` share an IsoFLOP curve (tokens are rounded to whole batches)."""
    groups: dict[float, list[Point]] = {}
    for p in sorted(points, key=lambda p: p.flops):
        key = next((c for c in groups if abs(p.flops / c - 1) <= rel), p.flops)
        groups.setdefault(key, []).append(p)
    return groups


def isoflop_fits(points: list[Point]) -> list[IsoFlop]:
    out = []
    for c, group in group_by_budget(points).items():
        if len(group) < 3:
            continue
        x = np.log([p.n_params for p in group])
        y = np.array([p.loss for p in group])
        c0, c1, c2 = np.polyfit(x, y, 2)
        if c0 <= 0:
            continue  # no minimum: the sweep does not bracket the optimum at this budget
        x_opt = -c1 / (2 * c0)
        n_opt = math.exp(x_opt)
        out.append(IsoFlop(c, n_opt, c / (6 * n_opt), c2 - c1**2 / (4 * c0), (c0, c1, c2), len(group)))
    return out


def _huber(r, delta: float):
    import torch

    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _predict(theta, ln_n, ln_d):
    """log L_hat = LSE(a - alpha ln N, b - beta ln D, e); theta = (a, b, e, alpha, beta)."""
    import torch

    terms = [theta[0] - theta[3] * ln_n, theta[1] - theta[4] * ln_d, theta[2].expand_as(ln_n)]
    return torch.logsumexp(torch.stack(terms), dim=0)


def _lbfgs(theta0: list[float], ln_n, ln_d, ln_l, delta: float) -> tuple[float, list[float]]:
    """One L-BFGS run of the Huber objective from `theta0`; (objective, theta)."""
    import torch

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def objective():
        opt.zero_grad()
        value = _huber(_predict(theta, ln_n, ln_d) - ln_l, delta).sum()
        value.backward()
        return value

    opt.step(objective)
    with torch.no_grad():
        return float(_huber(_predict(theta, ln_n, ln_d) - ln_l, delta).sum()), theta.tolist()


def fit_parametric(points: list[Point], *, delta: float = HUBER_DELTA) -> tuple[ParametricLaw, float]:
    """Chinchilla approach 3: Huber on log L over (a, b, e, alpha, beta), A = e^a, B = e^b, E = e^e."""
    import torch

    if len(points) < 5:
        raise ConfigError("fit.runs", len(points), "the parametric L(N, D) has 5 constants: need >= 5 runs")
    n = np.array([p.n_params for p in points])
    d = np.array([p.tokens for p in points])
    loss = np.array([p.loss for p in points])
    # Starting points: for (alpha, beta) on a grid, L is linear in (E, A, B): least squares, keep positive fits.
    starts = []
    for alpha in np.linspace(0.05, 1.2, 24):
        for beta in np.linspace(0.05, 1.2, 24):
            x = np.stack([np.ones_like(n), n**-alpha, d**-beta], axis=1)
            coef, *_ = np.linalg.lstsq(x, loss, rcond=None)
            if (coef <= 0).any():
                continue
            obj = float(_huber(torch.tensor(np.log(x @ coef) - np.log(loss)), delta).sum())
            starts.append((obj, alpha, beta, *coef))
    if not starts:
        starts = [(0.0, 0.3, 0.3, loss.min() / 2, 100.0, 100.0)]
    starts.sort()
    ln_n, ln_d, ln_l = (torch.tensor(np.log(v), dtype=torch.float64) for v in (n, d, loss))
    best: tuple[float, list[float]] | None = None
    for _, alpha, beta, e, a, b in starts[:8]:
        theta0 = [math.log(a), math.log(b), math.log(e), alpha, beta]
        value, theta = _lbfgs(theta0, ln_n, ln_d, ln_l, delta)
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, theta)
    assert best is not None
    a, b, e, alpha, beta = best[1]
    return ParametricLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta), best[0]


def fit(points: list[Point]) -> Fit:
    curves = isoflop_fits(points)
    if len(curves) < 2:
        budgets = {c: len(g) for c, g in group_by_budget(points).items()}
        raise ConfigError(
            "fit.runs",
            len(points),
            f"need >= 3 runs bracketing the optimum at each of >= 2 budgets to fit N*(C); runs per budget: "
            f"{ {f'{c:.3g}': k for c, k in budgets.items()} }, parabolas with a minimum: {len(curves)}",
        )
    n_law = fit_power_law([c.flops for c in curves], [c.n_opt for c in curves])
    d_law = fit_power_law([c.flops for c in curves], [c.d_opt for c in curves])
    law, huber = fit_parametric(points) if len(points) >= 5 else (None, None)
    return Fit(curves, n_law, d_law, law, huber, len(points))


def to_json(f: Fit) -> dict:
    return {
        "runs": f.runs,
        "isoflops": [asdict(c) for c in f.isoflops],
        "n_opt": asdict(f.n_opt),
        "d_opt": asdict(f.d_opt),
        "parametric": asdict(f.parametric) if f.parametric else None,
        "huber": f.huber,
    }


def plot(f: Fit, points: list[Point], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = group_by_budget(points)
    cmap = plt.get_cmap("viridis")
    for i, (c, group) in enumerate(groups.items()):
        color = cmap(i / max(1, len(groups) - 1))
        ax1.scatter([p.n_params for p in group], [p.loss for p in group], color=color, label=f"C = {c:.2g}")
        curve = next((k for k in f.isoflops if k.flops == c), None)
        if curve is not None:
            xs = np.linspace(
                math.log(min(p.n_params for p in group)), math.log(max(p.n_params for p in group)), 50
            )
            ax1.plot(np.exp(xs), np.polyval(curve.coeffs, xs), color=color)
            ax1.scatter([curve.n_opt], [curve.loss_min], color=color, marker="*", s=120, edgecolor="k")
    ax1.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP curves")
    ax1.legend(fontsize=8)
    cs = np.array([k.flops for k in f.isoflops])
    grid = np.logspace(math.log10(cs.min()) - 0.5, math.log10(cs.max()) + 0.5, 50)
    ax2.scatter(cs, [k.n_opt for k in f.isoflops], color="C0")
    ax2.plot(
        grid,
        f.n_opt.coef * grid**f.n_opt.exponent,
        color="C0",
        label=f"N* = {f.n_opt.coef:.3g} C^{f.n_opt.exponent:.3f}",
    )
    ax2.scatter(cs, [k.d_opt for k in f.isoflops], color="C1")
    ax2.plot(
        grid,
        f.d_opt.coef * grid**f.d_opt.exponent,
        color="C1",
        label=f"D* = {f.d_opt.coef:.3g} C^{f.d_opt.exponent:.3f}",
    )
    if f.parametric is not None:
        opt = [f.parametric.optimal(c) for c in grid]
        ax2.plot(grid, [o[0] for o in opt], "--", color="C0", label="N* from L(N, D)")
        ax2.plot(grid, [o[1] for o in opt], "--", color="C1", label="D* from L(N, D)")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="compute-optimal N and D")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary(f: Fit) -> str:
    lines = ["budget      N*          D*          min loss  runs"]
    lines += [
        f"{c.flops:<11.3g} {c.n_opt:<11.4g} {c.d_opt:<11.4g} {c.loss_min:<9.4f} {c.points}"
        for c in f.isoflops
    ]
    lines.append(
        f"N*(C) = {f.n_opt.coef:.4g} C^{f.n_opt.exponent:.4f}   D*(C) = {f.d_opt.coef:.4g} C^{f.d_opt.exponent:.4f}"
    )
    if f.parametric is not None:
        p = f.parametric
        lines.append(
            f"L(N, D) = {p.E:.4g} + {p.A:.4g} / N^{p.alpha:.4f} + {p.B:.4g} / D^{p.beta:.4f}   (Huber {f.huber:.3g})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel.plan.fit", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", help="directory holding the sweep's runs (each with a scaling.json)")
    ap.add_argument(
        "--out", default=None, help="where fit.json and fit.png go (default: the sweep directory)"
    )
    args = ap.parse_args(argv)
    points = load_sweep(args.sweep)
    try:
        result = fit(points)
    except ConfigError as e:
        print(f"kiln fit: {e} (found {len(points)} {RECORD} under {args.sweep})", file=sys.stderr)
        return 2
    out = args.out or args.sweep
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fit.json"), "w") as fh:
        json.dump(to_json(result), fh, indent=1)
    png = plot(result, points, os.path.join(out, "fit.png"))
    print(summary(result))
    print(
        f"wrote {os.path.join(out, 'fit.json')} and {png}; plan with it: plan.fitted_law={os.path.join(out, 'fit.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
