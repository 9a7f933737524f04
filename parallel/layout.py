"""The one validated description of how a run is laid out over processes (CONVENTIONS 3).

`ParallelLayout` is also the schema of the `parallel` Hydra group. "axis" means a mesh axis, "dim" a tensor
dimension. Validation happens once, before any process group exists: `__post_init__` checks the layout against
the world size and the engine; `check_model` against the model (heads, kv heads, layers, experts);
`check_batch` against each stage's global batch and sequence length. Every error names the constraint, the
values and the nearest layouts that work.

Mesh (megatron-core's order, `parallel_state.initialize_model_parallel`):
  dense part   world = tp * cp * dp * pp
  expert part  world = etp * ep * edp * pp     (MoE layers; edp = expert data-parallel, inferred)
"""

from __future__ import annotations

from dataclasses import dataclass

from train.errors import ConfigError

ENGINES = ("megatron", "deepspeed")
RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "optimizer+param")


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
    engine: str = "megatron"
    """megatron (megatron-core DDP + distributed optimizer; TP/SP/PP/VPP/EP/ETP/CP) or deepspeed (ZeRO 1/2/3,
    CPU offload; data parallel, and tensor parallel through megatron-core's groups, without SP)."""
    tp: int = 1
    """Tensor-parallel axis size (splits heads, kv heads and the MLP width)."""
    sp: bool = False
    """Sequence parallelism on the tensor-parallel axis: norms and dropout on seq/tp tokens (needs tp > 1)."""
    pp: int = 1
    """Pipeline-parallel axis size (splits the layers; 1F1B schedule)."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; > 1 selects the interleaved 1F1B schedule."""
    ep: int = 1
    """Expert-parallel axis size (splits the experts of MoE layers)."""
    etp: int = 1
    """Expert tensor-parallel axis size (splits each expert's MLP)."""
    cp: int = 1
    """Context-parallel axis size: each rank holds 2 of 2*cp chunks of every sequence; attention all-gathers the
    keys and values over the axis (parallel/context.py; TransformerEngine's own CP with attention_backend=te)."""
    dp: int = -1
    """Data-parallel axis size; -1 infers it as world_size / (tp * cp * pp)."""
    zero_stage: int = 1
    """ZeRO stage: 0 replicated optimizer; 1 optimizer state sharded over dp (megatron: the distributed
    optimizer); 2 + gradients (deepspeed); 3 + parameters (deepspeed)."""
    offload: str = "none"
    """CPU offload (deepspeed): none, optimizer (ZeRO >= 1), optimizer+param (ZeRO-3)."""
    recompute: str = "none"
    """Activation recompute: none, selective (core attention, Korthikanti et al. 2022) or full (every layer)."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduce with the backward pass (bucketed; megatron)."""
    micro_batch: int = 2
    """Sequences per micro-batch on each data-parallel rank."""
    grad_accum: int = -1
    """Micro-batches per optimizer step on each data-parallel rank; -1 infers it from each stage's global batch
    (global batch = dp * micro_batch * grad_accum)."""
    max_restarts: int = 0
    """torchrun `--max-restarts` of the local launch (`python -m train` starting torchrun itself): when a rank
    dies, torchrun stops the others and restarts all of them, up to this many times; each restart resumes from
    the last complete checkpoint. Under Slurm the job is requeued instead (cluster.slurm.max_restarts)."""

    def __post_init__(self) -> None:
        for key in ("nproc_per_node", "nnodes", "tp", "pp", "vpp", "ep", "etp", "cp", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}", getattr(self, key), "must be >= 1")
        if self.max_restarts < 0:
            raise ConfigError("parallel.max_restarts", self.max_restarts, "must be >= 0 (0: no restarts)")
        for key in ("dp", "grad_accum"):
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{key}", value, "use a positive size, or -1 to infer it")
        if self.engine not in ENGINES:
            raise ConfigError("parallel.engine", self.engine, f"choose one of {', '.join(ENGINES)}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError("parallel.recompute", self.recompute, f"choose one of {', '.join(RECOMPUTE)}")
        if self.offload not in OFFLOAD:
            raise ConfigError("parallel.offload", self.offload, f"choose one of {', '.join(OFFLOAD)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("parallel.zero_stage", self.zero_stage, "choose 0, 1, 2 or 3")
        if self.sp and self.tp == 1:
            raise ConfigError(
                "parallel.sp", self.sp, "sequence parallelism needs parallel.tp > 1; set sp=false"
            )
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(
                "parallel.vpp", self.vpp, "virtual pipeline stages need parallel.pp > 1; set vpp=1 or pp>=2"
            )
        self._check_world()
        self._check_engine()

    # ------------------------------------------------------------------------------------ world size
    def _check_world(self) -> None:
        world = self.world_size
        dense = self.tp * self.cp * self.pp
        if world % dense:
            fits = [d for d in _divisors(world) if (world // d) % (self.cp * self.pp) == 0]
            pp_fits = [p for p in _divisors(world) if (world // p) % (self.tp * self.cp) == 0]
            raise ConfigError(
                "parallel.tp",
                self.tp,
                f"tp*cp*pp={self.tp}*{self.cp}*{self.pp}={dense} does not divide the world size {world}; "
                f"try {_nearest('tp', self.tp, fits)}"
                + (f" or {_nearest('pp', self.pp, pp_fits)}" if self.pp > 1 and pp_fits else ""),
            )
        if self.dp != -1 and self.dp * dense != world:
            raise ConfigError(
                "parallel.dp",
                self.dp,
                f"dp*tp*cp*pp must equal the world size {world}; use dp={world // dense} or dp=-1",
            )
        expert = self.ep * self.etp * self.pp
        if world % expert:
            fits = [e for e in _divisors(world // (self.etp * self.pp))]
            raise ConfigError(
                "parallel.ep",
                self.ep,
                f"ep*etp*pp={self.ep}*{self.etp}*{self.pp}={expert} does not divide the world size {world}; "
                f"try {_nearest('ep', self.ep, fits)}",
            )

    # ------------------------------------------------------------------------------------ engines
    def _check_engine(self) -> None:
        if self.engine == "megatron":
            if self.zero_stage > 1:
                raise ConfigError(
                    "parallel.zero_stage",
                    self.zero_stage,
                    "the megatron engine shards optimizer state only (zero_stage=1, the distributed "
                    "optimizer); use zero_stage=1, or engine=deepspeed for ZeRO-2/3",
                )
            if self.offload != "none":
                raise ConfigError(
                    "parallel.offload",
                    self.offload,
                    "CPU offload is a deepspeed feature in Kiln; set offload=none or engine=deepspeed",
                )
            return
        # deepspeed: ZeRO over the data-parallel axis, megatron-core's tensor-parallel groups handed in as `mpu`.
        if self.sp:
            raise ConfigError(
                "parallel.sp",
                self.sp,
                "engine=deepspeed does not all-reduce the sequence-parallel norm gradients over tp "
                "(megatron's finalize_model_grads does); set sp=false, or engine=megatron",
            )
        for key, why in (
            ("pp", "DeepSpeed's pipeline engine allows only ZeRO-1 and needs a PipelineModule"),
            ("ep", "DeepSpeed's MoE layer is not megatron-core's MoE, and is refused with ZeRO-3"),
            ("cp", "context parallelism is megatron's (engine=megatron)"),
        ):
            if getattr(self, key) > 1:
                raise ConfigError(
                    f"parallel.{key}",
                    getattr(self, key),
                    f"engine=deepspeed runs data and tensor parallel only in Kiln: {why}; set {key}=1, or "
                    "engine=megatron (zero_stage<=1)",
                )
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ConfigError(
                "parallel.offload", self.offload, "optimizer offload needs zero_stage >= 1; try zero_stage=1"
            )
        if self.offload == "optimizer+param" and self.zero_stage != 3:
            raise ConfigError(
                "parallel.offload",
                self.offload,
                f"parameter offload needs zero_stage=3 (got {self.zero_stage}); "
                "try zero_stage=3, or offload=optimizer",
            )

    # ------------------------------------------------------------------------------------ sizes
    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def expert_dp_size(self) -> int:
        return self.world_size // (self.ep * self.etp * self.pp)

    @property
    def distributed_optimizer(self) -> bool:
        """megatron: shard the optimizer state over the data-parallel axis (ZeRO-1)."""
        return self.engine == "megatron" and self.zero_stage == 1

    # ------------------------------------------------------------------------------------ the model
    def check_model(self, *, heads: int, kv_heads: int, layers: int | None = None, experts: int = 0) -> None:
        """Tensor parallelism splits heads and kv heads; pipeline stages (times virtual stages) split layers;
        expert parallelism splits experts."""
        world = self.world_size
        for count, what in ((kv_heads, "kv heads"), (heads, "attention heads")):
            if count % self.tp:
                fits = [
                    d for d in _divisors(kv_heads) if heads % d == 0 and world % (d * self.cp * self.pp) == 0
                ]
                raise ConfigError(
                    "parallel.tp",
                    self.tp,
                    f"tp={self.tp} does not divide {count} {what} ({heads} heads, {kv_heads} kv heads); "
                    f"try {_nearest('tp', self.tp, fits)}",
                )
        if layers is not None and layers % (self.pp * self.vpp):
            chunks = self.pp * self.vpp
            pps = [
                p for p in _divisors(layers) if layers % (p * self.vpp) == 0 and world % (p * self.tp) == 0
            ]
            vpps = [v for v in _divisors(layers // self.pp) if layers % self.pp == 0]
            hint = _nearest("pp", self.pp, pps)
            if self.vpp > 1 and vpps:
                hint += f", or vpp in {vpps}"
            raise ConfigError(
                "parallel.pp",
                self.pp,
                f"pp*vpp={self.pp}*{self.vpp}={chunks} model chunks do not divide {layers} layers; try {hint}",
            )
        if self.ep > 1 or self.etp > 1:
            if experts == 0:
                raise ConfigError(
                    "parallel.ep" if self.ep > 1 else "parallel.etp",
                    self.ep if self.ep > 1 else self.etp,
                    "expert parallelism needs a mixture-of-experts model (this one has no experts); set ep=1 etp=1",
                )
            if experts % self.ep:
                fits = [e for e in _divisors(experts) if world % (e * self.etp * self.pp) == 0]
                raise ConfigError(
                    "parallel.ep",
                    self.ep,
                    f"ep={self.ep} does not divide {experts} experts; try {_nearest('ep', self.ep, fits)}",
                )
        if experts and self.tp > 1 and not self.sp:
            raise ConfigError(
                "parallel.sp",
                self.sp,
                "megatron-core MoE layers with tp > 1 need sequence parallelism; set sp=true",
            )

    # ------------------------------------------------------------------------------------ the batch
    def check_batch(
        self, *, key: str, sequences: int, seq_length: int | None = None, seq_key: str | None = None
    ) -> None:
        """A global batch of `sequences` must split into whole micro-batches on every data-parallel rank
        (and into `grad_accum` of them when it is set); SP and CP split the sequence (`seq_key` names the
        setting of `seq_length`; default: the `seq_length` next to `key`)."""
        per_step = self.dp_size * self.micro_batch
        if sequences % per_step:
            lo = max(per_step, sequences // per_step * per_step)
            raise ConfigError(
                key,
                sequences,
                f"the global batch ({sequences} sequences) must be a multiple of dp*micro_batch = "
                f"{self.dp_size}*{self.micro_batch} = {per_step}; try {lo} or {lo + per_step} sequences",
            )
        accum = sequences // per_step
        if self.grad_accum != -1 and accum != self.grad_accum:
            raise ConfigError(
                "parallel.grad_accum",
                self.grad_accum,
                f"{key}: a global batch of {sequences} sequences = dp*micro_batch*grad_accum = "
                f"{self.dp_size}*{self.micro_batch}*grad_accum needs grad_accum={accum}; "
                f"set grad_accum={accum} or -1 (infer)",
            )
        if self.pp > 1 and self.vpp > 1 and accum % self.pp:
            raise ConfigError(
                key,
                sequences,
                f"the interleaved pipeline schedule needs micro-batches per step ({accum}) to be a multiple "
                f"of pp={self.pp}; try {-(-accum // self.pp) * self.pp * per_step} sequences",
            )
        if seq_length is not None:
            split = (self.tp if self.sp else 1) * 2 * self.cp if self.cp > 1 else (self.tp if self.sp else 1)
            if seq_length % split:
                if self.cp == 1:
                    what = "tp (sequence parallel)"
                else:  # megatron-core's CP layout: 2*cp chunks per sequence (parallel/context.py)
                    what = "tp*2*cp (sequence and context parallel)" if self.sp else "2*cp (context parallel)"
                raise ConfigError(
                    seq_key or key.rsplit(".", 1)[0] + ".seq_length",
                    seq_length,
                    f"the sequence length must be a multiple of {what} = {split}; "
                    f"try {max(split, seq_length // split * split)}",
                )

    def model_state_bytes(
        self, params: int, *, embedding_params: int = 0, mixed_precision: bool = False
    ) -> dict[str, float]:
        """Bytes on the fullest rank of parameters, gradients and Adam state for a model of `params` parameters,
        as the layout shards them. Tensor parallelism splits everything tp ways (replicated norms ignored);
        pipeline parallelism splits the layers pp ways, while the first stage also holds the input embedding and
        the last the output layer (`embedding_params` each: vocab x hidden). ZeRO stage 1 shards the optimizer
        state over dp, stage 2 also the gradients, stage 3 also the parameters (Rajbhandari et al. 2020, "ZeRO",
        sec. 5.1 and Fig. 1), with the planner's bytes per parameter (parallel/plan/memory.py `state_bytes`).
        megatron-core's distributed optimizer shards over dp x cp (its data-parallel group with context
        parallel ranks: every CP rank holds the whole model)."""
        from parallel.plan.memory import state_bytes

        if self.pp > 1:
            psi = (params - 2 * embedding_params) / (self.tp * self.pp) + embedding_params / self.tp
        else:
            psi = params / self.tp
        weights, grads, optimizer = state_bytes(
            psi,
            dp=self.dp_size * (self.cp if self.engine == "megatron" else 1),
            engine=self.engine,
            zero=self.zero_stage,
            precision="bf16" if mixed_precision else "fp32",
        )
        return {"params": weights, "grads": grads, "optimizer": optimizer}

    def accum_steps(self, sequences: int) -> int:
        """Micro-batches per step on each data-parallel rank for a global batch of `sequences`."""
        return sequences // (self.dp_size * self.micro_batch)
