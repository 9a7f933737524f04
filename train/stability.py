"""Loss-spike and NaN detection with a configured policy (issue 6).

A step is *bad* when its loss or gradient norm is not finite, or its loss is a spike: above the mean of the
last `window` good losses by more than `spike_sigmas` standard deviations (and by at least `spike_min_rel`
of the mean, so a flat, noiseless curve does not flag tiny wiggles). This is the rolling z-score test used
for OLMo's spike monitoring; PaLM (Chowdhery et al. 2022, Sec. 5.1) handled spikes by restarting ~100 steps
earlier and skipping the 200-500 batches around them, which is the `rollback` policy here.

The loop (train/loop.py) hands `Guard.check` to the engine's `step(accept=...)`, which calls it after
forward-backward and before the update: the loss and gradient norm are agreed over all ranks (non-finite on one
rank is non-finite on every rank), so every rank takes the same decision, and a bad step is never applied.
Policies: `skip` drops the bad step's update (the batch is consumed, no weights or optimizer moments change);
`rollback` restores the stage's last complete checkpoint and goes on with the data after the bad batch (the
steps since the checkpoint count as consumed data, and the LR schedule stays at the data position); `stop`
ends the run with DivergenceError, whose ranks exit with DIVERGED_EXIT_CODE. Every policy escalates to `stop`
after `max_events` bad steps in a stage, so a diverged run does not loop forever. Each bad step is a record
`{"event": "stability", ...}` in metrics.jsonl.

Drills: KILN_FAULT_NAN_AT_STEP=<step>[,<step>...] makes the loss of those steps (1-based, within a stage)
read NaN on the last rank only, which exercises the agreement between ranks.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from train.errors import ConfigError

log = logging.getLogger(__name__)

POLICIES = ("skip", "rollback", "stop")
DIVERGED_EXIT_CODE = 3
"""Exit status of every rank (and of `python -m train`) when the run stopped on a bad step."""
DIVERGED_FILE = "diverged.txt"
"""In the run directory: the stop message, written by rank 0, read by the launcher (torchrun exits 1)."""
FAULT_ENV = "KILN_FAULT_NAN_AT_STEP"


@dataclass
class StabilityConfig:
    """`stability:` of the run; a stage overrides fields with `recipe.stages.<name>.stability`."""

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

    def action(self) -> str:
        """The policy's action for one more bad step: skip, rollback, or stop (policy stop, or more than
        max_events bad steps)."""
        self.events += 1
        return "stop" if self.events > self.cfg.max_events else self.cfg.policy


def fault_injected(step: int) -> bool:
    """Drills: `KILN_FAULT_NAN_AT_STEP` lists this step and this is the last rank."""
    steps = {s.strip() for s in os.environ.get(FAULT_ENV, "").split(",")}
    return str(step) in steps and dist.get_rank() == dist.get_world_size() - 1


def agree(values: list[float | None], device: torch.device) -> list[float | None]:
    """The values with every one that is non-finite on any rank made NaN on all ranks (one all-reduce)."""
    bad = torch.tensor(
        [float(v is not None and not math.isfinite(v)) for v in values], dtype=torch.float32, device=device
    )
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return [
        v if v is None or not flag or not math.isfinite(v) else math.nan
        for v, flag in zip(values, bad.tolist(), strict=True)
    ]


def for_stage(run: StabilityConfig, overrides: dict, *, key: str) -> StabilityConfig:
    """The run's stability settings with a stage's overrides (`recipe.stages.<name>.stability`)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(StabilityConfig)}
    for name in overrides:
        if name not in known:
            raise ConfigError(f"{key}.{name}", overrides[name], f"no such field; fields are {sorted(known)}")
    try:
        return dataclasses.replace(run, **overrides)
    except ConfigError as err:
        raise ConfigError(err.key.replace("stability", key, 1), err.value, err.fix) from None


def rollback(directory: str, *, engine, scheduler, full_verify: bool) -> str | None:
    """Restore the weights and optimizer state of the stage's last complete checkpoint; the LR schedule stays at
    the data position (the scheduler's own state is not loaded). Returns the checkpoint, or None when the stage
    saved none yet."""
    from train import checkpoint

    checkpoint.wait_for_saves()  # an async save in flight may be the newest good state
    path = checkpoint.latest(directory)
    if path is None:
        return None
    checkpoint.load(path, engine=engine, full_verify=full_verify)
    scheduler.step(increment=0)  # the loaded param groups carry the checkpoint's LR: set this step's again
    return path


class Guard:
    """One stage's detector: `check` before each update (all ranks, same answer), `event` after it."""

    def __init__(self, cfg: StabilityConfig, *, stage: str, device: torch.device) -> None:
        self.cfg, self.stage, self.device = cfg, stage, device
        self.monitor = SpikeMonitor(cfg)
        self.step, self.loss, self.grad_norm, self.reason = 0, math.nan, None, None

    @property
    def events(self) -> int:
        return self.monitor.events

    def check(self, step: int, loss: float, grad_norm: float | None) -> bool:
        """Whether step `step` (1-based) may update the weights. `grad_norm` is None where the engine knows it
        only after the update (DeepSpeed): `event` judges it then."""
        if fault_injected(step):
            loss = math.nan
        self.loss, self.grad_norm = agree([loss, grad_norm], self.device)
        self.step, self.reason = step, self.monitor.judge(self.loss, self.grad_norm)
        return self.reason is None

    def event(self, grad_norm: float | None) -> dict | None:
        """After the step: its stability record (action skip, rollback or stop) when it was bad, else None."""
        if self.reason is None and self.grad_norm is None and grad_norm is not None:
            (self.grad_norm,) = agree([grad_norm], self.device)
            if not math.isfinite(self.grad_norm):
                self.monitor.history.pop()  # judged good on its loss alone
                self.reason = f"non-finite gradient norm {self.grad_norm}"
        if self.reason is None:
            return None
        action = self.monitor.action()
        record = {
            "stage": self.stage,
            "step": self.step,
            "event": "stability",
            "reason": self.reason,
            "action": action,
            "stability/loss": self.loss,
            "stability/grad_norm": self.grad_norm,
            "stability/events": self.events,
        }
        log.warning(
            "%s step %d: %s (loss %s, grad norm %s): %s (bad step %d of at most %d)",
            self.stage,
            self.step,
            self.reason,
            self.loss,
            self.grad_norm,
            action,
            self.events,
            self.cfg.max_events,
        )
        return record

    def stop(self, run_dir: str) -> None:
        """End the run on the last bad step: DivergenceError naming stage, step, loss and grad norm; rank 0
        leaves the message in <run_dir>/diverged.txt for the launcher."""
        why = "policy stop" if self.cfg.policy == "stop" else f"more than max_events={self.cfg.max_events}"
        message = (
            f"stage {self.stage!r} step {self.step}: {self.reason} (loss {self.loss}, grad norm "
            f"{self.grad_norm}); stopping ({why}, {self.events} bad steps in the stage); exit code "
            f"{DIVERGED_EXIT_CODE}. Its last checkpoint holds earlier weights: lower the LR, raise warmup or "
            "clip_grad, or set stability.policy=skip/rollback"
        )
        if dist.get_rank() == 0:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, DIVERGED_FILE), "w") as f:
                f.write(message + "\n")
        raise DivergenceError(message)
