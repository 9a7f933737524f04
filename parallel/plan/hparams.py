"""Batch size, learning rate, warm-up and schedule for a compute budget.

- Batch and LR: DeepSeek LLM (Bi et al. 2024, "DeepSeek LLM: Scaling Open-Source Language Models with
  Longtermism", Sec. 3.1, Eq. 1): eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271, with B in tokens and C = M D,
  M the non-embedding FLOPs per token (Eq. 2: 72 n_layer d^2 + 12 n_layer d l_seq, i.e. 6 x the layers' weights
  plus the full attention-score matrix; no vocabulary term). Fitted for AdamW (beta2 0.95, weight decay 0.1,
  clip 1.0) with a warm-up and step decay; the paper's 7B and 67B settings (9.4M / 18.9M tokens, 4.2e-4 /
  3.2e-4) sit on it.
- Warm-up: DeepSeek LLM Sec. 2.3: linear over 2000 steps; capped here at 10% of the run (a planner choice, so a
  small run is not all warm-up).
- Schedule: cosine to 10% of the peak (Hoffmann et al. 2022, Sec. 3 / Appendix B: "decay the learning rate by
  10x"), or WSD with a 20% 1-sqrt cool-down, which matches cosine at any length (Hägele et al. 2024, "Scaling
  Laws and Compute-Optimal Training Beyond Fixed Training Durations", Sec. 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.plan.flops import as_plan_arch, param_count
from train.errors import ConfigError

WARMUP_STEPS = 2000
WARMUP_MAX_FRACTION = 0.10
MIN_LR_RATIO = 0.1
WSD_DECAY_FRACTION = 0.2
PLAN_SCHEDULES = ("cosine", "wsd")


def deepseek_batch_tokens(flops: float) -> float:
    """B_opt in tokens (DeepSeek LLM Eq. 1); `flops` is C = M x D."""
    return 0.2920 * flops**0.3271


def deepseek_lr(flops: float) -> float:
    """eta_opt (DeepSeek LLM Eq. 1)."""
    return 0.3118 * flops**-0.1250


def non_embedding_flops_per_token(arch: object, *, seq_length: int, vocab_size: int) -> float:
    """DeepSeek LLM's M: 6 x (attention + MLP weights a token uses) + the full score matrix, no vocabulary."""
    a = as_plan_arch(arch)
    n = param_count(a, vocab_size=vocab_size)
    qk, v = a.score_dims
    return 6 * (n.attention + n.mlp_active) + 6 * a.num_layers * (qk + v) * seq_length


@dataclass(frozen=True)
class Hparams:
    tokens: int
    """Training tokens, whole batches."""
    batch_tokens: int
    batch_sequences: int
    lr: float
    min_lr: float
    warmup_tokens: int
    schedule: str
    decay_tokens: int
    """WSD's cool-down length (0 for cosine)."""
    decay_style: str = "1-sqrt"

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


def round_batch(batch_tokens: float, *, seq_length: int, multiple: int = 1) -> int:
    """Sequences per global batch: the power of two nearest (in log) to `batch_tokens / seq_length`, then the
    nearest multiple of `multiple` (DP x micro-batch), at least one multiple."""
    seqs = max(1.0, batch_tokens / seq_length)
    pow2 = 2 ** round(math.log2(seqs))
    return max(multiple, round(pow2 / multiple) * multiple)


def hparams(
    *,
    flops: float,
    tokens: float,
    seq_length: int,
    schedule: str = "cosine",
    batch_multiple: int = 1,
) -> Hparams:
    """Batch, LR, warm-up and decay for a run of `tokens` tokens at budget `flops` (= M x D, DeepSeek's C)."""
    if schedule not in PLAN_SCHEDULES:
        raise ConfigError("plan.schedule", schedule, f"choose one of {', '.join(PLAN_SCHEDULES)}")
    if not flops > 0 or not tokens > 0:
        raise ConfigError("plan.flops", flops, "the budget and the tokens must be > 0")
    seqs = round_batch(deepseek_batch_tokens(flops), seq_length=seq_length, multiple=batch_multiple)
    batch = seqs * seq_length
    tokens_i = max(batch, int(tokens) // batch * batch)  # whole steps
    steps = tokens_i // batch
    warmup_steps = min(WARMUP_STEPS, int(WARMUP_MAX_FRACTION * steps))
    lr = deepseek_lr(flops)
    decay = max(batch, int(WSD_DECAY_FRACTION * steps) * batch) if schedule == "wsd" else 0
    return Hparams(
        tokens=tokens_i,
        batch_tokens=batch,
        batch_sequences=seqs,
        lr=lr,
        min_lr=MIN_LR_RATIO * lr if schedule == "cosine" else 0.0,
        warmup_tokens=warmup_steps * batch,
        schedule=schedule,
        decay_tokens=decay,
    )
