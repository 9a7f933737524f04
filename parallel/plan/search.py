"""The layout search: every layout of a cluster allocation that is valid for the model, dropped when over
memory, ranked by predicted time per token.

Axes, in Megatron's rank order: TP inside a node (a divisor of the GPUs per node that divides the heads and KV
heads), CP (long contexts only), PP (a divisor of the layers), DP the rest; EP (MoE) a divisor of the experts
inside DP x TP x CP; virtual stages, micro-batch, recompute and ZeRO stage per engine. Sequence parallelism is on
whenever TP > 1 (it only saves memory: Korthikanti et al. 2022, Sec. 4.2.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from parallel.plan.flops import as_plan_arch
from parallel.plan.hparams import round_batch
from parallel.plan.memory import Layout, Memory, memory_per_gpu
from parallel.plan.steptime import Link, StepTime, step_time
from train.errors import ConfigError

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTES = ("none", "selective", "full")
LONG_CONTEXT = 32_768  # context parallelism is searched from this sequence length on


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    batch_sequences: int
    seq_length: int
    memory: Memory
    time: StepTime

    @property
    def seconds_per_token(self) -> float:
        return self.time.total / (self.batch_sequences * self.seq_length)

    @property
    def tokens_per_s(self) -> float:
        return 1 / self.seconds_per_token


@dataclass(frozen=True)
class SearchResult:
    fits: list[Candidate]
    """Layouts within memory, fastest first."""
    nearest: Candidate | None
    """When nothing fits: the layout with the smallest memory (what comes closest)."""
    tried: int
    memory_limit: float


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(arch: object, *, world: int, gpus_per_node: int, seq_length: int, engine: str = "megatron"):
    """Every structurally valid layout of `world` GPUs (memory not checked)."""
    a = as_plan_arch(arch)
    tps = [
        t
        for t in _divisors(min(gpus_per_node, world))
        if a.num_attention_heads % t == 0 and (a.is_mla or a.num_kv_heads % t == 0)
    ]
    cps = [
        c for c in (1, 2, 4, 8, 16) if c == 1 or (seq_length >= LONG_CONTEXT and seq_length % (2 * c) == 0)
    ]
    zeros = (1,) if engine == "megatron" else (1, 2, 3)
    for tp in tps:
        for cp in cps:
            for pp in _divisors(a.num_layers):
                if world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                eps = [e for e in _divisors(a.num_experts) if (dp * tp * cp) % e == 0] if a.is_moe else [1]
                vpps = [1] + ([2] if pp > 1 and (a.num_layers // pp) % 2 == 0 else [])
                for ep in eps:
                    for vpp in vpps:
                        for zero in zeros:
                            yield Layout(
                                tp=tp,
                                pp=pp,
                                dp=dp,
                                ep=ep,
                                cp=cp,
                                vpp=vpp,
                                sp=tp > 1,
                                engine=engine,
                                zero=zero,
                            )


def search(
    arch: object,
    *,
    vocab_size: int,
    seq_length: int,
    batch_tokens: float,
    world: int,
    gpus_per_node: int,
    memory_limit: float,
    peak_flops: float,
    link: Link,
    efficiency: float = 0.55,
    engine: str = "megatron",
    flash_attention: bool = True,
) -> SearchResult:
    """Layouts of `world` GPUs for a global batch near `batch_tokens`, fitting `memory_limit` bytes per GPU."""
    if world < 1:
        raise ConfigError("plan.nodes", world, "need at least one GPU")
    fits: list[Candidate] = []
    nearest: Candidate | None = None
    tried = 0
    for base in layouts(arch, world=world, gpus_per_node=gpus_per_node, seq_length=seq_length, engine=engine):
        for mb in MICRO_BATCHES:
            seqs = round_batch(batch_tokens, seq_length=seq_length, multiple=base.dp * mb)
            m = seqs // (base.dp * mb)
            if base.pp > 1 and m < base.pp:
                continue  # fewer micro-batches than stages: the pipeline never fills
            if base.vpp > 1 and m % base.pp:
                continue  # Megatron's interleaved schedule needs micro-batches in multiples of PP
            for rc in RECOMPUTES:
                layout = dataclasses.replace(base, micro_batch=mb, recompute=rc)
                tried += 1
                mem = memory_per_gpu(
                    arch,
                    layout,
                    vocab_size=vocab_size,
                    seq_length=seq_length,
                    num_microbatches=m,
                    flash_attention=flash_attention,
                )
                if mem.total > memory_limit:
                    if nearest is None or mem.total < nearest.memory.total:
                        t = step_time(
                            arch, layout, vocab_size=vocab_size, seq_length=seq_length, batch_sequences=seqs,
                            peak_flops=peak_flops, link=link, efficiency=efficiency,
                        )  # fmt: skip
                        nearest = Candidate(layout, seqs, seq_length, mem, t)
                    continue
                t = step_time(
                    arch, layout, vocab_size=vocab_size, seq_length=seq_length, batch_sequences=seqs,
                    peak_flops=peak_flops, link=link, efficiency=efficiency,
                )  # fmt: skip
                fits.append(Candidate(layout, seqs, seq_length, mem, t))
    # Fastest per token; among equals the least memory (more room for fragmentation), then the simplest layout.
    fits.sort(
        key=lambda c: (
            c.seconds_per_token,
            c.layout.pp,
            c.layout.tp,
            RECOMPUTES.index(c.layout.recompute),
            c.memory.total,
        )
    )
    return SearchResult(fits, None if fits else nearest, tried, memory_limit)
