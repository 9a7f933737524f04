"""Batch-size and sequence-length ramps: a stage's steps as phases of one global batch and one training length.

A stage trains on packed samples of `seq_length` tokens (+1 for the labels), `batch_tokens` per step. Its ramps
change that early in the stage, both keyed on the tokens trained so far:

- `batch_ramp: [[until_tokens, batch_tokens], ...]`: the global batch is the entry's `batch_tokens` while the
  stage has trained fewer than `until_tokens` tokens (the first entry whose `until_tokens` is larger applies),
  then the stage's own `batch_tokens`. Llama 3 405B: 4M tokens to 252M, 8M to 2.87T, then 16M (Dubey et al.
  2024, Sec. 3.4.1); megatron-core's `--rampup-batch-size` and OLMo-core's batch-size warm-up do the same.
- `seq_ramp: [[until_tokens, seq_length], ...]`: sequence-length warm-up (Li et al. 2022, "The Stability-
  Efficiency Dilemma"; Llama 3 trained at 4,096 before 8,192): while it applies, each packed sample is cut into
  `stage.seq_length / length` sequences of `length` tokens with their own positions 0..length-1. The tokens per
  step, the data order and the data position do not change (no token is dropped), only the attention span.

A phase changes at the first step that starts at or past an `until_tokens`; the stage trains whole steps only
(its last partial batch is not trained, as without ramps). Everything here is a pure function of the stage
config, so a resumed run finds its step's batch, length and data position again.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    first_step: int
    steps: int
    first_token: int
    """Training tokens before the phase's first step."""
    first_sample: int
    """Packed samples (of the stage's seq_length) consumed before the phase's first step."""
    batch_tokens: int
    seq_length: int
    """Length of the sequences trained on in this phase (divides sample_length)."""
    sample_length: int
    """The stage's seq_length: the length of the packed samples."""

    @property
    def samples_per_step(self) -> int:
        return self.batch_tokens // self.sample_length

    @property
    def split(self) -> int:
        """Training sequences per packed sample."""
        return self.sample_length // self.seq_length

    @property
    def end_step(self) -> int:
        return self.first_step + self.steps

    @property
    def end_token(self) -> int:
        return self.first_token + self.steps * self.batch_tokens

    def first_sample_of(self, step: int) -> int:
        """The global index of step `step`'s first packed sample."""
        return self.first_sample + (step - self.first_step) * self.samples_per_step


def _value_at(ramp: list, tokens: int, final: int) -> int:
    for until, value in ramp:
        if tokens < until:
            return int(value)
    return final


def phases(
    *, tokens: int, seq_length: int, batch_tokens: int, batch_ramp: list, seq_ramp: list
) -> list[Phase]:
    """The stage's steps as phases of constant batch and training length (one phase without ramps).
    Expects a validated stage (train/config.py StageConfig.validate)."""
    breaks = sorted({int(u) for u, _ in [*batch_ramp, *seq_ramp] if int(u) < tokens})
    out: list[Phase] = []
    t = step = sample = 0
    while True:
        b = _value_at(batch_ramp, t, batch_tokens)
        s = _value_at(seq_ramp, t, seq_length)
        room = (tokens - t) // b  # whole steps left in the stage at this batch
        nxt = next((u for u in breaks if u > t), None)
        n = room if nxt is None else min(room, -(-(nxt - t) // b))
        if n <= 0:
            break
        out.append(Phase(step, n, t, sample, b, s, seq_length))
        t, step, sample = t + n * b, step + n, sample + n * (b // seq_length)
    return out


def phase_at(plan: list[Phase], step: int) -> Phase:
    """The phase holding step `step` (0-based)."""
    return plan[max(0, bisect_right([p.first_step for p in plan], step) - 1)]


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a step that took the stage from `before` to `after` tokens passed a multiple of `every` (0:
    never): how `eval_every_tokens` and `save_every_tokens` become steps, whatever the batch."""
    return bool(every) and after // every > before // every


def crossings(plan: list[Phase], every: int) -> int:
    """Steps of the plan, the last one excluded, for which `crossed` holds."""
    if not every:
        return 0
    count = 0
    for p in plan:
        if p.batch_tokens >= every:  # every step passes at least one multiple
            count += p.steps
        else:  # at most one multiple per step: count the multiples in the phase
            count += p.end_token // every - p.first_token // every
    last_before = plan[-1].end_token - plan[-1].batch_tokens
    return count - crossed(last_before, plan[-1].end_token, every)


def is_boundary(plan: list[Phase], tokens: int) -> bool:
    """Whether some step of the plan ends at exactly `tokens` trained tokens."""
    return any(
        p.first_token < tokens <= p.end_token and (tokens - p.first_token) % p.batch_tokens == 0 for p in plan
    )


def step_micro_batches(
    dataset, plan: list[Phase], step: int, *, dp_rank: int, dp_size: int, micro_batch: int
):
    """This data-parallel rank's micro-batches of step `step`: its share of the step's packed samples, tagged
    with their blend sources, cut into the phase's training length."""
    from data import blend
    from train import metrics

    phase = phase_at(plan, step)
    idx = blend.step_indices(
        phase.first_sample_of(step), batch_sequences=phase.samples_per_step, dp_rank=dp_rank, dp_size=dp_size
    )
    micro = blend.micro_batches(dataset, idx, micro_batch=micro_batch)
    metrics.tag_sources(micro, dataset, idx)
    return blend.split_sequences(micro, phase.seq_length) if phase.split > 1 else micro
