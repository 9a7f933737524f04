"""The one validated description of how a run is laid out over processes (CONVENTIONS 3).

`ParallelLayout` is also the schema of the `parallel` Hydra group. "axis" means a mesh axis.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.errors import ConfigError

ENGINES = ("megatron",)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(name: str, value: int, candidates: list[int]) -> str:
    """The valid values nearest to `value`, for an error message ("tp=2 or tp=4")."""
    below = [c for c in candidates if c < value]
    above = [c for c in candidates if c > value]
    picks = ([max(below)] if below else []) + ([min(above)] if above else [])
    return " or ".join(f"{name}={p}" for p in picks or candidates[:1])


@dataclass
class ParallelLayout:
    nproc_per_node: int = 2
    """Processes per node (GPUs per node on a cluster, CPU processes here)."""
    nnodes: int = 1
    """Number of nodes."""
    tp: int = 1
    """Tensor-parallel axis size."""
    sp: bool = False
    """Sequence parallelism on the tensor-parallel axis (needs tp > 1)."""
    pp: int = 1
    """Pipeline-parallel axis size."""
    dp: int = -1
    """Data-parallel axis size; -1 infers it as world_size / (tp * pp)."""
    engine: str = "megatron"
    """Training engine: megatron (megatron-core DDP + distributed optimizer)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over the data-parallel axis (ZeRO-1, megatron-core DistributedOptimizer)."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduce with the backward pass (bucketed)."""
    micro_batch: int = 2
    """Sequences per micro-batch on each data-parallel rank."""

    def __post_init__(self) -> None:
        for key in ("nproc_per_node", "nnodes", "tp", "pp", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}", getattr(self, key), "must be >= 1")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(
                "parallel.dp", self.dp, "use a positive size, or -1 to infer it from the world size"
            )
        if self.engine not in ENGINES:
            raise ConfigError("parallel.engine", self.engine, f"choose one of {', '.join(ENGINES)}")
        if self.sp and self.tp == 1:
            raise ConfigError(
                "parallel.sp", self.sp, "sequence parallelism needs parallel.tp > 1; set sp=false"
            )
        if self.pp > 1:
            raise ConfigError(
                "parallel.pp",
                self.pp,
                "pipeline parallelism is not wired into the training loop yet; use pp=1",
            )
        world = self.world_size
        if world % (self.tp * self.pp):
            raise ConfigError(
                "parallel.tp",
                self.tp,
                f"tp*pp={self.tp * self.pp} must divide the world size {world}; "
                f"try {_nearest('tp', self.tp, [d for d in _divisors(world) if (world // d) % self.pp == 0])}",
            )
        if self.dp != -1 and self.dp * self.tp * self.pp != world:
            raise ConfigError(
                "parallel.dp",
                self.dp,
                f"dp*tp*pp must equal the world size {world}; use dp={world // (self.tp * self.pp)} or dp=-1",
            )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def check_model(self, *, heads: int, kv_heads: int) -> None:
        """Tensor parallelism splits attention heads and kv heads: tp must divide both."""
        if heads % self.tp or kv_heads % self.tp:
            fits = [d for d in _divisors(kv_heads) if heads % d == 0 and self.world_size % d == 0]
            raise ConfigError(
                "parallel.tp",
                self.tp,
                f"tp must divide {heads} heads and {kv_heads} kv heads; try {_nearest('tp', self.tp, fits)}",
            )

    def check_batch(self, *, key: str, sequences: int) -> None:
        """A global batch of `sequences` must split into whole micro-batches on every data-parallel rank."""
        per_step = self.dp_size * self.micro_batch
        if sequences % per_step:
            lo = max(per_step, sequences // per_step * per_step)
            raise ConfigError(
                key,
                sequences,
                f"the global batch ({sequences} sequences) must be a multiple of dp*micro_batch = "
                f"{self.dp_size}*{self.micro_batch} = {per_step}; try {lo} or {lo + per_step} sequences",
            )

    def grad_accum(self, sequences: int) -> int:
        """Micro-batches per step on each data-parallel rank for a global batch of `sequences`."""
        return sequences // (self.dp_size * self.micro_batch)
