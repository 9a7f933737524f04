"""Learning-rate schedules counted in tokens (CONVENTIONS 7), on megatron-core's OptimizerParamScheduler.

The scheduler's "steps" are tokens: the loop calls `scheduler.step(batch_tokens)` once per optimizer step, so
warm-up, decay and WSD's cool-down are all stated in tokens and survive a change of batch size.

- cosine / linear: warm-up, then decay from the peak to `min_lr` over the rest of the stage (Loshchilov & Hutter
  2017 for cosine).
- constant: warm-up, then the peak.
- wsd: warm-up, stable at the peak, then a final decay of `decay_tokens` to `min_lr` shaped linear, cosine or
  1-sqrt (Hu et al. 2024, MiniCPM; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations", who find 1-sqrt over ~20% of training matches cosine).
- wsd_s: WSD with decay branches inside the stage (Wen et al. 2024, "Understanding Warmup-Stable-Decay Learning
  Rates: A River Valley Loss Landscape Perspective", Sec. 5): the LR decays to `min_lr` over `decay_tokens`
  before each of `branch_tokens` and before the stage's end, and after a branch goes straight back to the peak,
  training on from the decayed weights; a checkpoint is saved at each branch end (a finished model per budget
  from one run). A branch from a separate checkpoint of the stable phase instead is a later stage with
  `init_from` that checkpoint and a linear schedule to 0.
- Annealing from a checkpoint's LR: `lr: null` (the loop takes the init_from checkpoint's last LR as the peak),
  `schedule: linear`, `min_lr: 0`.
"""

from __future__ import annotations

SCHEDULES = ("cosine", "linear", "constant", "wsd", "wsd_s")
# Kiln's names for WSD's decay shape -> megatron-core's `lr_wsd_decay_style`.
WSD_DECAY_STYLES = {"linear": "linear", "cosine": "cosine", "1-sqrt": "minus_sqrt"}


def build_scheduler(
    optimizer,
    *,
    peak_lr: float,
    min_lr: float,
    tokens: int,
    warmup_tokens: int,
    schedule: str,
    decay_tokens: int = 0,
    decay_style: str = "1-sqrt",
    weight_decay: float = 0.0,
    branch_tokens: list[int] | tuple[int, ...] = (),
):
    """A megatron-core OptimizerParamScheduler whose steps are tokens; weight decay stays constant.
    `branch_tokens`: schedule=wsd_s's branch ends before the stage's end."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    wsd = schedule in ("wsd", "wsd_s")
    kind = OptimizerParamScheduler
    if schedule == "wsd_s":
        kind = _branched(OptimizerParamScheduler, [*sorted(branch_tokens), tokens])
    return kind(
        optimizer,
        init_lr=0.0,
        max_lr=peak_lr,
        min_lr=min(min_lr, peak_lr),
        lr_warmup_steps=warmup_tokens,
        lr_decay_steps=tokens,
        lr_decay_style="WSD" if wsd else schedule,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=tokens,
        wd_incr_style="constant",
        wsd_decay_steps=decay_tokens if wsd else None,
        lr_wsd_decay_style=WSD_DECAY_STYLES[decay_style] if wsd else None,
    )


def _branched(base, ends: list[int]):
    """`base` (megatron's scheduler) whose WSD decay ends at the first of `ends` not yet passed: each segment
    between branch ends is a WSD schedule ending at its branch end (no second warm-up)."""

    class BranchedWSD(base):
        def get_lr(self, param_group):
            end = next((e for e in ends if self.num_steps <= e), ends[-1])
            whole, self.lr_decay_steps = self.lr_decay_steps, end
            try:
                return super().get_lr(param_group)
            finally:
                self.lr_decay_steps = whole

    return BranchedWSD
