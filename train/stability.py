"""Loss-spike and NaN detection with a configured policy (issue 6).

A step is *bad* when its loss or gradient norm is not finite, or its loss is a spike: above the mean of the
last `window` good losses by more than `spike_sigmas` standard deviations (and by at least `spike_min_rel`
of the mean, so a flat, noiseless curve does not flag tiny wiggles). This is the rolling z-score test used
for OLMo's spike monitoring; PaLM (Chowdhery et al. 2022, Sec. 5.1) handled spikes by restarting ~100 steps
earlier and skipping the 200-500 batches around them, which is the `rollback` policy here.

Policies: `skip` drops the bad step's update (the batch is consumed, no weights or optimizer moments change);
`rollback` restores the last complete checkpoint and skips the data of the steps since it; `stop` saves
nothing and ends the run with a clear error. Every policy escalates to `stop` after `max_events` bad steps
in a stage, so a diverged run does not loop forever.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from train.errors import ConfigError

POLICIES = ("skip", "rollback", "stop")


@dataclass
class StabilityConfig:
    policy: str = "skip"
    """What a bad step (non-finite loss/grad norm, or a loss spike) does: skip, rollback or stop."""
    spike_sigmas: float = 6.0
    """A loss this many standard deviations above the recent mean is a spike (0 disables spike detection)."""
    spike_min_rel: float = 0.1
    """...and at least this fraction above the recent mean."""
    window: int = 50
    """Recent good steps the mean and deviation are taken over."""
    min_history: int = 10
    """Good steps needed before spikes are judged (non-finite values are always bad)."""
    max_events: int = 5
    """Bad steps per stage after which the run stops whatever the policy."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("stability.policy", self.policy, f"choose one of {', '.join(POLICIES)}")
        if self.spike_sigmas < 0 or self.spike_min_rel < 0:
            raise ConfigError("stability.spike_sigmas", self.spike_sigmas, "must be >= 0 (0 disables)")
        if self.window < 2 or not 1 <= self.min_history <= self.window:
            raise ConfigError(
                "stability.min_history",
                self.min_history,
                f"must be in [1, window={self.window}], window >= 2",
            )
        if self.max_events < 1:
            raise ConfigError("stability.max_events", self.max_events, "must be >= 1")


class DivergenceError(RuntimeError):
    """The run stopped on a bad step (policy stop, or too many bad steps)."""


@dataclass
class SpikeMonitor:
    cfg: StabilityConfig
    history: deque = field(default_factory=deque)
    events: int = 0

    def judge(self, loss: float, grad_norm: float | None) -> str | None:
        """The reason this step is bad ('non-finite loss', 'loss spike ...'), or None for a good step.
        Good steps enter the history; bad ones never do."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm}"
        reason = self._spike(loss)
        if reason is None:
            self.history.append(loss)
            if len(self.history) > self.cfg.window:
                self.history.popleft()
        return reason

    def _spike(self, loss: float) -> str | None:
        n = len(self.history)
        if not self.cfg.spike_sigmas or n < self.cfg.min_history:
            return None
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
        limit = max(mean + self.cfg.spike_sigmas * std, mean * (1 + self.cfg.spike_min_rel))
        if loss > limit:
            return f"loss spike {loss:.4f} > {limit:.4f} (mean {mean:.4f}, std {std:.4f} over {n} steps)"
        return None

    def action(self, reason: str, *, step: int) -> str:
        """The policy's action for a bad step: 'skip' or 'rollback'; raises DivergenceError for stop."""
        self.events += 1
        if self.cfg.policy == "stop" or self.events > self.cfg.max_events:
            why = "policy stop" if self.cfg.policy == "stop" else f"more than {self.cfg.max_events} bad steps"
            raise DivergenceError(f"step {step}: {reason}; stopping ({why})")
        return self.cfg.policy
