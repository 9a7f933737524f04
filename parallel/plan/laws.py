"""Compute-optimal model size N and tokens D for a training budget C (FLOPs), with C = 6 N D.

Sources:
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla): Approach 1 (Table 3's
  projections), Approach 3 (the parametric loss L(N, D) = E + A / N^alpha + B / D^beta, Eq. 2 and 10).
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI): Approach 3 refitted.
- Dubey et al. 2024, "The Llama 3 Herd of Models", Sec. 3.2.1: D*(C) = A C^alpha with (alpha, A) = (0.53, 0.29).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.plan.hardware import budget_from_gpu_hours  # noqa: F401  (budgets in GPU-hours, re-exported)
from train.errors import ConfigError

# Hoffmann et al. 2022, Table 3 (Approach 1): (parameters, training FLOPs, training tokens).
CHINCHILLA_TABLE3: tuple[tuple[float, float, float], ...] = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (loss in nats per token; N parameters, D tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N*, D*) minimizing L under C = 6 N D (Hoffmann et al. Eq. 4 / Appendix D.2):
        N* = G (C/6)^(beta/(alpha+beta)), D* = G^-1 (C/6)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return g * (flops / 6) ** (b / (a + b)), (flops / 6) ** (a / (a + b)) / g


CHINCHILLA = ParametricLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. Eq. 10
EPOCH = ParametricLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * C^exponent."""

    coef: float
    exponent: float

    def __call__(self, flops: float) -> float:
        return self.coef * flops**self.exponent


def fit_power_law(xs: list[float], ys: list[float]) -> PowerLaw:
    """Least squares on log y = log coef + exponent log x."""
    if len(xs) < 2 or len(xs) != len(ys):
        raise ValueError(
            f"need >= 2 (x, y) pairs of equal count to fit a power law, got {len(xs)} and {len(ys)}"
        )
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    exponent = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    return PowerLaw(coef=math.exp(my - exponent * mx), exponent=exponent)


# Approach 1 as published: N*(C) fitted to Table 3's projections (exponent ~0.50, as the paper's Table 2).
CHINCHILLA_APPROACH1 = fit_power_law(
    [c for _, c, _ in CHINCHILLA_TABLE3], [n for n, _, _ in CHINCHILLA_TABLE3]
)

# Llama 3's tokens law with the paper's rounded constants. At C = 3.8e25 it gives 1.04e13 tokens, not the
# paper's 16.55T (with 402B parameters, i.e. 6ND = 3.99e25): the rounding of alpha matters at this scale. The
# paper's point is reproduced by alpha = 0.53 with coef ~0.46, or coef = 0.29 with alpha ~0.538.
LLAMA3_TOKENS = PowerLaw(coef=0.29, exponent=0.53)

LAWS = ("chinchilla_approach1", "chinchilla", "epoch", "llama3")


@dataclass(frozen=True)
class Sizing:
    law: str
    flops: float
    n_params: float
    n_tokens: float
    loss: float | None
    """Predicted final loss (nats/token) where the law has one."""

    @property
    def tokens_per_param(self) -> float:
        return self.n_tokens / self.n_params


def compute_optimal(flops: float, *, law: str = "epoch") -> Sizing:
    """N*, D* and the predicted loss for a budget of `flops` training FLOPs under one of `LAWS`."""
    if not flops > 0:
        raise ConfigError("plan.flops", flops, "the budget must be a positive number of FLOPs, e.g. 1e21")
    if law == "chinchilla_approach1":
        n = CHINCHILLA_APPROACH1(flops)
        d = flops / (6 * n)
    elif law in ("chinchilla", "epoch"):
        n, d = (CHINCHILLA if law == "chinchilla" else EPOCH).optimal(flops)
    elif law == "llama3":
        d = LLAMA3_TOKENS(flops)
        n = flops / (6 * d)
    else:
        raise ConfigError("plan.law", law, f"choose one of {', '.join(LAWS)}")
    loss = (CHINCHILLA if law.startswith("chinchilla") else EPOCH).loss(n, d) if law != "llama3" else None
    return Sizing(law=law, flops=flops, n_params=n, n_tokens=d, loss=loss)


def overtrained(flops: float, *, tokens_per_param: float, loss_law: ParametricLaw = EPOCH) -> Sizing:
    """A smaller model trained longer than compute-optimal (Llama 3 8B: 15T tokens, ~1,900 per parameter):
    C = 6 N D with D = r N gives N = sqrt(C / (6 r))."""
    if not tokens_per_param > 0:
        raise ConfigError(
            "plan.tokens_per_param", tokens_per_param, "must be > 0 (Chinchilla-optimal is ~20)"
        )
    n = math.sqrt(flops / (6 * tokens_per_param))
    d = tokens_per_param * n
    return Sizing(
        law=f"{tokens_per_param:g} tokens/param",
        flops=flops,
        n_params=n,
        n_tokens=d,
        loss=loss_law.loss(n, d),
    )
