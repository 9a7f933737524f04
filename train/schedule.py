"""Learning-rate schedules counted in tokens (CONVENTIONS 7), on megatron-core's OptimizerParamScheduler.

The scheduler's "steps" are tokens: the loop calls `scheduler.step(batch_tokens)` once per optimizer step, so
warm-up, decay and WSD's cool-down are all stated in tokens and survive a change of batch size.

- cosine / linear: warm-up, then decay from the peak to `min_lr` over the rest of the stage (Loshchilov & Hutter
  2017 for cosine).
- constant: warm-up, then the peak.
- wsd: warm-up, stable at the peak, then a final decay of `decay_tokens` to `min_lr` shaped linear, cosine or
  1-sqrt (Hu et al. 2024, MiniCPM; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations", who find 1-sqrt over ~20% of training matches cosine). A WSD-S decay branch is a later
  stage with `init_from` a checkpoint of the stable phase and a linear schedule to 0.
- Annealing from a checkpoint's LR: `lr: null` (the loop takes the init_from checkpoint's last LR as the peak),
  `schedule: linear`, `min_lr: 0`.
"""

from __future__ import annotations

SCHEDULES = ("cosine", "linear", "constant", "wsd")
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
):
    """A megatron-core OptimizerParamScheduler whose steps are tokens; weight decay stays constant."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    wsd = schedule == "wsd"
    return OptimizerParamScheduler(
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
