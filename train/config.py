"""Config schema: one dataclass per Hydra group, registered in the ConfigStore (CONVENTIONS 4).

The YAML files in `configs/<group>/` only override these. Each dataclass validates itself in
`__post_init__`; `validate()` checks what spans groups (mix vs sources, batch vs layout, heads vs tp).
All of it runs before any process starts or any data is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data.config import DataConfig
from models.arch import Arch, attention_backend
from models.registry import resolve_arch
from parallel.layout import ParallelLayout
from train.checkpoint import CheckpointConfig, ResumeConfig
from train.errors import ConfigError
from train.ramp import Phase, crossings, is_boundary, phases
from train.schedule import SCHEDULES, WSD_DECAY_STYLES
from train.stability import StabilityConfig, for_stage

WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")


# ----------------------------------------------------------------------------------------------- data
# The data group's schema (DataConfig, SourceConfig, TokenizerConfig, ...) lives in data/config.py.


# ---------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    family: str = "llama3"
    """Model family (models/registry.py): llama3, mistral, mixtral, qwen2, gemma2, deepseek_v2."""
    size: str = "tiny"
    """A size of the family, defined in code (e.g. models/llama.py sizes(); `tiny` for every family)."""
    num_layers: int | None = None
    """Overrides of the size's values; null keeps the size's own."""
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    ffn_hidden_size: int | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Overrides of any other architecture field (models/arch.py Arch), e.g. `+model.extra.sliding_window=512`,
    `+model.extra.rope={kind: yarn, factor: 4}` or `+model.extra.moe={top_k: 1}`."""
    attention_backend: str = "auto"
    """Core attention (models/spec.py): auto (te when TransformerEngine imports, else sdpa), sdpa (torch's
    scaled_dot_product_attention: FlashAttention/cuDNN on GPU), local (megatron-core's unfused attention, the
    reference path) or te. Numerics and checkpoints are the same whichever runs."""

    def arch(self) -> Arch:
        overrides = {k: v for k, v in vars(self).items() if k not in _NOT_ARCH and v is not None}
        extra = OmegaConf.to_container(self.extra) if isinstance(self.extra, DictConfig) else dict(self.extra)
        clash = sorted(set(extra) & set(overrides))
        if clash:
            raise ConfigError(
                f"model.extra.{clash[0]}", extra[clash[0]], f"set it as model.{clash[0]} instead"
            )
        return resolve_arch(self.family, self.size, **overrides, **extra)

    def __post_init__(self) -> None:
        self.arch()  # raises ConfigError naming the bad key
        attention_backend(self.attention_backend)


_NOT_ARCH = ("family", "size", "extra", "attention_backend")


# ---------------------------------------------------------------------------------------------- stage
PASSKEY_MIN_CONTEXT = 256
"""Shortest passkey context: the needle and question take up to ~220 tokens with a byte-level tokenizer."""


@dataclass
class StageConfig:
    tokens: int = 1_000_000
    """Training tokens of this stage."""
    seq_length: int = 256
    """Context length of this stage's samples."""
    batch_tokens: int = 4096
    """Global batch in tokens (a multiple of seq_length); steps = tokens / batch_tokens."""
    batch_ramp: list[list[int]] = field(default_factory=list)
    """Batch-size ramp, [[until_tokens, batch_tokens], ...] with until_tokens increasing: the global batch is an
    entry's batch_tokens while the stage has trained fewer than its until_tokens tokens, then the stage's
    batch_tokens (train/ramp.py). Llama 3 405B: [[252000000000, 4194304], [2870000000000, 8388608]] before 16M."""
    seq_ramp: list[list[int]] = field(default_factory=list)
    """Sequence-length warm-up, [[until_tokens, seq_length], ...]: while an entry applies, each packed sample is
    trained as seq_length / <entry> sequences of the entry's length (same tokens per step; train/ramp.py)."""
    lr: float | None = 3e-3
    """Peak learning rate; null starts from the learning rate the init_from checkpoint ended at."""
    min_lr: float = 3e-4
    """Learning rate at the end of the schedule."""
    warmup_tokens: int = 0
    """Linear warm-up length in tokens."""
    schedule: str = "cosine"
    """After warm-up: cosine, linear, constant, or wsd (stable at the peak, then a final decay; train/schedule.py)."""
    decay_tokens: int = 0
    """schedule=wsd: tokens of the final decay to min_lr (about 20% of the stage is the usual choice)."""
    decay_style: str = "1-sqrt"
    """schedule=wsd: shape of the final decay: linear, cosine or 1-sqrt."""
    branch_tokens: list[int] = field(default_factory=list)
    """schedule=wsd_s: training tokens at which a decay branch ends before the stage's end (each decays over
    decay_tokens, saves a checkpoint, then the LR returns to the peak; train/schedule.py)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    init_from: str | None = None
    """Where the weights start: null (random init), an earlier stage of the recipe, or a checkpoint directory."""
    keep_optimizer: bool = False
    """With init_from: also load the optimizer state (else it starts fresh)."""
    rope_theta: float | None = None
    """RoPE base for this stage (null: the model's own). Raising it for a longer context is "ABF" (Xiong et
    al. 2023); Llama 3 pre-trained at 500k."""
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    """RoPE scaling for this stage, fields of models.arch.RopeScaling: {kind: linear|dynamic|yarn|llama3, factor,
    original_context, ...}; empty keeps the model's own. A long-context stage sets it (and its later stages keep
    it, since they continue that model)."""
    mix: dict[str, float] = field(default_factory=dict)
    """Sampling weight per data source name (normalized)."""
    eval_every_tokens: int = 0
    """Validation every this many training tokens (0: only at the start and end of the stage)."""
    eval_tokens: int = 16_384
    """Validation tokens per source."""
    save_every_tokens: int = 0
    """Checkpoint every this many tokens (0: only at the end of the stage)."""
    average_last: int = 0
    """After the stage, average the weights of its last this many checkpoints (the final one included) and
    save the result under <stage>/averaged (0: no averaging); the stage keeps at least this many checkpoints
    whatever checkpoint.keep_last says. Llama 3 does this at the end of annealing."""
    stability: dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's `stability` fields for this stage (train/stability.py), e.g.
    `+recipe.stages.anneal.stability.policy=stop`; empty keeps the run's."""
    passkey_contexts: list[int] = field(default_factory=list)
    """At the end of the stage, the passkey-retrieval probe (train/evals.py) at these context lengths, in
    tokens (empty: no probe). Contexts past seq_length test extrapolation."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the key is hidden, as a fraction of the filler (0: start, 1: just before the question)."""
    passkey_trials: int = 2
    """Samples (random keys) per context and depth."""

    def arch(self, model: Arch) -> Arch:
        """The model architecture this stage trains: `model` with the stage's RoPE changes."""
        import dataclasses

        from models.arch import RopeScaling

        changes: dict[str, Any] = {}
        if self.rope_theta is not None:
            changes["rope_theta"] = self.rope_theta
        if self.rope_scaling:
            scaling = dict(self.rope_scaling)
            try:
                changes["rope"] = RopeScaling(**scaling)
            except TypeError as err:
                known = ", ".join(f.name for f in dataclasses.fields(RopeScaling))
                raise ConfigError("rope_scaling", scaling, f"{err}; its fields are {known}") from None
        return dataclasses.replace(model, **changes) if changes else model

    def validate(self, name: str) -> None:
        key = f"recipe.stages.{name}"
        for attr in ("tokens", "seq_length", "batch_tokens", "eval_tokens"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{key}.{attr}", getattr(self, attr), "must be > 0")
        if self.batch_tokens % self.seq_length:
            raise ConfigError(
                f"{key}.batch_tokens",
                self.batch_tokens,
                f"must be a multiple of seq_length={self.seq_length}; try "
                f"{max(1, self.batch_tokens // self.seq_length) * self.seq_length}",
            )
        self._check_ramps(key)
        first = self.batch_ramp[0][1] if self.batch_ramp else self.batch_tokens
        if self.tokens < first:
            raise ConfigError(f"{key}.tokens", self.tokens, f"must cover at least one batch ({first} tokens)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{key}.schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_tokens < self.tokens:
            raise ConfigError(
                f"{key}.warmup_tokens", self.warmup_tokens, f"must be in [0, tokens={self.tokens})"
            )
        if self.schedule in ("wsd", "wsd_s"):
            if self.decay_style not in WSD_DECAY_STYLES:
                raise ConfigError(
                    f"{key}.decay_style", self.decay_style, f"choose one of {', '.join(WSD_DECAY_STYLES)}"
                )
            room = self.tokens - self.warmup_tokens
            if not 0 < self.decay_tokens <= room:
                raise ConfigError(
                    f"{key}.decay_tokens",
                    self.decay_tokens,
                    f"schedule=wsd needs a decay in (0, tokens - warmup_tokens = {room}]; "
                    f"e.g. {max(1, room // 5)} (20% of the stage)",
                )
        if self.branch_tokens and self.schedule != "wsd_s":
            raise ConfigError(
                f"{key}.branch_tokens",
                list(self.branch_tokens),
                "only schedule=wsd_s has branches; set it or []",
            )
        if self.schedule == "wsd_s":
            ends = [self.warmup_tokens, *self.branch_tokens, self.tokens]
            for i, (before, end) in enumerate(zip(ends, ends[1:])):
                if end - self.decay_tokens < before or (
                    i < len(self.branch_tokens) and not is_boundary(self.plan(), end)
                ):
                    raise ConfigError(
                        f"{key}.branch_tokens",
                        list(self.branch_tokens),
                        f"each branch end must end a step (a multiple of batch_tokens={self.batch_tokens} "
                        "without a batch_ramp), in increasing "
                        f"order, at least decay_tokens={self.decay_tokens} after warm-up and the previous branch, "
                        f"and that much before tokens={self.tokens}",
                    )
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(
                f"{key}.lr", self.lr, "must be > 0, or null to continue from the checkpoint's LR"
            )
        if self.min_lr < 0 or (self.lr is not None and self.min_lr > self.lr):
            raise ConfigError(f"{key}.min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        if self.average_last:
            saved = crossings(self.plan(), self.save_every_tokens) + 1
            if not 1 < self.average_last <= saved:
                raise ConfigError(
                    f"{key}.average_last",
                    self.average_last,
                    f"needs 2..{saved} (the checkpoints this stage saves: {self.steps} steps, one every "
                    f"{self.save_every_tokens or self.tokens} tokens and the last); save more often with "
                    "save_every_tokens, or use 0",
                )
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise ConfigError(
                f"{key}.rope_theta", self.rope_theta, "must be > 0, or null for the model's own"
            )
        if any(c < PASSKEY_MIN_CONTEXT for c in self.passkey_contexts):
            raise ConfigError(
                f"{key}.passkey_contexts",
                list(self.passkey_contexts),
                f"each context must be >= {PASSKEY_MIN_CONTEXT} tokens (room for the needle and question "
                f"with any tokenizer), e.g. [{PASSKEY_MIN_CONTEXT}, {max(PASSKEY_MIN_CONTEXT, self.seq_length)}]",
            )
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths) or not self.passkey_depths:
            raise ConfigError(
                f"{key}.passkey_depths", list(self.passkey_depths), "give depths in [0, 1], e.g. [0, 0.5, 1]"
            )
        if self.passkey_trials < 1:
            raise ConfigError(f"{key}.passkey_trials", self.passkey_trials, "must be >= 1")
        if not self.mix or any(w <= 0 for w in self.mix.values()):
            raise ConfigError(
                f"{key}.mix", dict(self.mix), "give each source a weight > 0, e.g. {code: 0.7, docs: 0.3}"
            )

    def _check_ramps(self, key: str) -> None:
        for attr, what in (("batch_ramp", "batch_tokens"), ("seq_ramp", "seq_length")):
            ramp = getattr(self, attr)
            example = "[[1000000, 4096]]" if attr == "batch_ramp" else f"[[1000000, {self.seq_length // 2}]]"
            ok = all(isinstance(e, (list, tuple)) and len(e) == 2 for e in ramp)
            until = [e[0] for e in ramp] if ok else []
            if not ok or any(not 0 < u < self.tokens for u in until) or until != sorted(set(until)):
                raise ConfigError(
                    f"{key}.{attr}",
                    [list(e) if isinstance(e, (list, tuple)) else e for e in ramp],
                    f"give [[until_tokens, {what}], ...] with until_tokens increasing in (0, tokens={self.tokens}),"
                    f" e.g. {example}",
                )
        for _, b in self.batch_ramp:
            if b <= 0 or b % self.seq_length:
                raise ConfigError(
                    f"{key}.batch_ramp",
                    [list(e) for e in self.batch_ramp],
                    f"batch {b}: each batch must be a positive multiple of seq_length={self.seq_length}",
                )
        for _, s in self.seq_ramp:
            if not 0 < s < self.seq_length or self.seq_length % s:
                raise ConfigError(
                    f"{key}.seq_ramp",
                    [list(e) for e in self.seq_ramp],
                    f"length {s}: each length must divide seq_length={self.seq_length} and be shorter, e.g. "
                    f"{self.seq_length // 2}",
                )

    def plan(self) -> list[Phase]:
        """The stage's steps as phases of one batch size and training length (train/ramp.py)."""
        return phases(
            tokens=self.tokens,
            seq_length=self.seq_length,
            batch_tokens=self.batch_tokens,
            batch_ramp=[list(e) for e in self.batch_ramp],
            seq_ramp=[list(e) for e in self.seq_ramp],
        )

    @property
    def steps(self) -> int:
        plan = self.plan()
        return plan[-1].end_step if plan else 0

    @property
    def trained_tokens(self) -> int:
        """Tokens the stage trains on: `tokens` less the last partial batch."""
        plan = self.plan()
        return plan[-1].end_token if plan else 0

    @property
    def samples(self) -> int:
        """Packed samples the stage consumes."""
        plan = self.plan()
        return plan[-1].first_sample_of(plan[-1].end_step) if plan else 0

    @property
    def batch_sequences(self) -> int:
        return self.batch_tokens // self.seq_length


@dataclass
class RecipeConfig:
    name: str = MISSING
    """Name of the recipe; the default run name."""
    stages: dict[str, StageConfig] = field(default_factory=dict)
    """Stages in the order they run (configs/stage/*.yaml, overridden by the recipe)."""
    flops: float | None = None
    """IsoFLOP sweeps: the training budget (FLOPs, C = 6ND) the stages' tokens are sized for
    (configs/recipe/isoflop_sweep.yaml); recorded with the run's N, D and loss in scaling.json."""


# -------------------------------------------------------------------------------------------- logging
@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default, never needs network), online or disabled."""
    project: str = "kiln"
    entity: str | None = None


@dataclass
class LoggingConfig:
    level: str = "INFO"
    log_every_steps: int = 10
    """Metrics (loss, LR, grad norm, tokens/s) are logged every this many steps."""
    progress: bool = True
    """A progress bar on rank 0 when stdout is a terminal (log lines otherwise)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = True
    """Also write TensorBoard event files to <run_dir>/tensorboard."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; null takes it from the device table for cluster.gpu
    (train/metrics.py peak_flops_per_device); MFU is not logged when neither knows it."""
    flops_convention: str = "megatron"
    """FLOPs per token definition shared with the planner (parallel/plan/flops.py): megatron or torchtitan."""
    update_ratio: bool = True
    """Log ||update|| / ||params|| (costs one copy of the rank's parameters on logging steps)."""
    straggler_every_steps: int = 50
    """Gather per-rank step times every this many steps and warn about slow ranks (0 disables)."""
    straggler_factor: float = 1.5
    """A rank is a straggler when its busy step time exceeds the median across ranks by this factor."""
    predicted: dict[str, float] = field(default_factory=dict)
    """What the planner predicted for this run, by metric key (time/step, tokens_per_s, tokens_per_s_per_gpu,
    mfu, mem/peak_allocated_gb); `python -m parallel.plan` writes it into the generated config, the run keeps
    it as <run_dir>/plan.json and the report plots it against the measured values."""

    def __post_init__(self) -> None:
        if self.flops_convention not in ("megatron", "torchtitan"):
            raise ConfigError(
                "logging.flops_convention", self.flops_convention, "choose megatron or torchtitan"
            )
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError("logging.peak_tflops", self.peak_tflops, "must be > 0 TFLOP/s, or null")
        if self.straggler_every_steps < 0:
            raise ConfigError("logging.straggler_every_steps", self.straggler_every_steps, "must be >= 0")
        for key, value in self.predicted.items():
            if not value > 0:
                raise ConfigError(
                    f"logging.predicted.{key}", value, "must be > 0 (as the planner predicts it), or drop it"
                )
        if self.straggler_factor <= 1:
            raise ConfigError(
                "logging.straggler_factor", self.straggler_factor, "must be > 1 (e.g. 1.5 = 50% slower)"
            )
        if self.wandb.mode not in WANDB_MODES:
            raise ConfigError(
                "logging.wandb.mode", self.wandb.mode, f"choose one of {', '.join(WANDB_MODES)}"
            )
        if self.log_every_steps < 1:
            raise ConfigError("logging.log_every_steps", self.log_every_steps, "must be >= 1")


# -------------------------------------------------------------------------------------------- cluster
@dataclass
class SlurmOptions:
    """What `python -m slurm` puts in the sbatch header and before `srun` (slurm/ renders it)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    """Wall-clock limit per job (HH:MM:SS or D-HH:MM:SS); preemption/time-limit handling requeues the job."""
    constraint: str | None = None
    exclusive: bool = True
    mem: str | None = None
    """Memory per node as sbatch takes it ("0" = all of it); null leaves Slurm's default."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before srun (module load, venv or conda activation)."""
    container_image: str | None = None
    """Run inside this container image (pyxis `--container-image`) when set."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment exported in the job (NCCL settings, timeouts)."""
    max_restarts: int = 10
    """Requeues after preemption or time limit before the job gives up."""
    signal_lead_s: int = 300
    """Seconds before the time limit Slurm signals the job (`--signal=B:USR1@<lead>`): one training step plus
    one checkpoint write, with margin (Slurm may send it up to 60 s early)."""
    cpus_per_node: int | None = None
    """CPUs per node for the job (`--cpus-per-task`, one task per node); null leaves Slurm's default."""
    venv: str | None = None
    """A virtualenv to activate in the job (`source <venv>/bin/activate`)."""
    python: str | None = None
    """Interpreter the job runs; null: `python` when a venv or container is set, else the submitting one."""
    container_mounts: str | None = None
    """pyxis `--container-mounts` with container_image (the run directory must be visible inside)."""
    port_base: int = 15000
    """Rendezvous port = port_base + job id % 10000, so two jobs on one node do not collide."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra `#SBATCH` options as given to sbatch (e.g. "--gres=gpu:8", "--reservation=x")."""

    def __post_init__(self) -> None:
        limit = slurm_time_seconds(self.time)
        if limit is None:
            raise ConfigError(
                "cluster.slurm.time",
                self.time,
                "use Slurm's format: MM, HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00",
            )
        if not 0 < self.signal_lead_s < limit:
            raise ConfigError(
                "cluster.slurm.signal_lead_s",
                self.signal_lead_s,
                f"must be > 0 and shorter than the time limit ({limit} s), sized to one step + one checkpoint",
            )
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise ConfigError("cluster.slurm.cpus_per_node", self.cpus_per_node, "must be >= 1 or null")
        if not 1024 <= self.port_base <= 55535:
            raise ConfigError("cluster.slurm.port_base", self.port_base, "use a port in 1024..55535")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (sbatch(1) --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S), None if malformed."""
    import re

    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        return None
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


@dataclass
class ClusterConfig:
    """The machines a run goes on: what the planner sizes against and what the Slurm launcher renders."""

    name: str = "local"
    gpu: str = "cpu"
    """Accelerator kind, a key of the planner's device table (cpu, h100_sxm, h200, a100)."""
    gpus_per_node: int = 2
    """Accelerators per node (processes per node on CPU)."""
    max_nodes: int = 1
    """Nodes the planner may use."""
    intra_node_gbps: float = 0.0
    """Unidirectional bandwidth per GPU inside a node in GB/s (NVLink 4: 450); 0 = unknown."""
    inter_node_gbps: float = 0.0
    """Unidirectional network bandwidth per GPU between nodes in GB/s (NDR InfiniBand 400 Gb/s: 50)."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ConfigError("cluster.gpus_per_node", self.gpus_per_node, "must be >= 1")
        if self.max_nodes < 1:
            raise ConfigError("cluster.max_nodes", self.max_nodes, "must be >= 1")
        for key in ("intra_node_gbps", "inter_node_gbps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"cluster.{key}", getattr(self, key), "must be >= 0 (0 = unknown)")
        if self.slurm.max_restarts < 0:
            raise ConfigError("cluster.slurm.max_restarts", self.slurm.max_restarts, "must be >= 0")


# ----------------------------------------------------------------------------------------------- root
@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    parallel: ParallelLayout = MISSING
    recipe: RecipeConfig = MISSING
    logging: LoggingConfig = MISSING
    cluster: ClusterConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Retention (keep last K, every M tokens) and verification of checkpoints (train/checkpoint.py)."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Config changes a resume may make on purpose (train/checkpoint.py check_resume)."""
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    """Loss-spike / NaN detection and what a bad step does: skip, rollback or stop (train/stability.py)."""
    experiment: str = "kiln"
    """Run directory is runs/<experiment>/<name>."""
    name: str = "${recipe.name}"
    run_dir: str = "runs/${experiment}/${name}"
    """Deterministic (no timestamp): a re-launched or requeued job finds its own checkpoints."""
    seed: int = 1234
    """Seed of model initialization."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    only_stage: str | None = None
    """Run just this stage of the recipe (its init_from must already be trained)."""
    sample_prompt: str = "def "
    """Prompt of the greedy sample printed in the final report."""
    sample_tokens: int = 40


def register() -> None:
    ConfigStore.instance().store(name="kiln_schema", node=TrainConfig)
    from parallel.plan.sweep import register_resolvers  # ${isoflop_tokens:...} of the sweep recipe

    register_resolvers()
    # hydra/launcher=kiln_slurm (configs/hydra/launcher/): the cluster's sbatch settings in submitit's units.
    resolvers = {
        "kiln_minutes": lambda t: -(-slurm_time_seconds(t) // 60),
        "kiln_gpus": lambda gpu, n: None if gpu == "cpu" else int(n),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def to_config(cfg: DictConfig) -> TrainConfig:
    """Resolve and type the composed config, then validate it as a whole. Raises ConfigError."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)
    validate(obj)
    return obj


def _check_rope(name: str, stage: StageConfig, stages: dict[str, StageConfig], model: Arch) -> None:
    """The stage's RoPE changes make a valid architecture, and reach its context: plain RoPE does not
    extrapolate past the context the init_from stage trained at (Press et al. 2022, Fig. 1; Chen et al. 2023,
    Sec. 1), linear interpolation reaches exactly that context x its factor, and llama3/yarn scaling starts
    from that context (original_context)."""
    key = f"recipe.stages.{name}"
    try:
        arch = stage.arch(model)
        arch.validate()
    except ConfigError as err:
        field_key = err.key.replace("model.rope.", "rope_scaling.").replace("model.rope_theta", "rope_theta")
        if field_key.startswith("model."):
            raise
        raise ConfigError(f"{key}.{field_key}", err.value, err.fix) from None
    parent = stages.get(stage.init_from) if stage.init_from else None
    if parent is None or stage.seq_length <= parent.seq_length:
        return
    before = parent.arch(model)

    def effective(rope):  # kind none ignores the other fields
        return None if rope.kind == "none" else rope

    if effective(arch.rope) == effective(before.rope) and arch.rope_theta == before.rope_theta:
        raise ConfigError(
            f"{key}.seq_length",
            stage.seq_length,
            f"longer than the {parent.seq_length} tokens {stage.init_from} trained at with the same RoPE, which "
            "does not extrapolate; set rope_scaling (e.g. {kind: linear, factor: "
            f"{stage.seq_length / parent.seq_length:g}}}) or a larger rope_theta for this stage",
        )
    if arch.rope.kind in ("llama3", "yarn") and effective(arch.rope) != effective(before.rope):
        # A new scaling of this kind treats wavelengths relative to the context the model was trained at. (It
        # reaches past original_context x factor: Llama 3.1 runs 128K from 8K with factor 8 at theta 500k.)
        rope = arch.rope
        if rope.original_context != parent.seq_length:
            raise ConfigError(
                f"{key}.rope_scaling.original_context",
                rope.original_context,
                f"{rope.kind} scaling starts from the context {stage.init_from} trained at: set "
                f"original_context={parent.seq_length}",
            )
    if arch.rope.kind == "linear":
        trained_factor = before.rope.factor if before.rope.kind == "linear" else 1.0
        reach = parent.seq_length * arch.rope.factor / trained_factor
        if stage.seq_length > reach:
            raise ConfigError(
                f"{key}.rope_scaling",
                dict(stage.rope_scaling),
                f"linear factor {arch.rope.factor:g} reaches {reach:g} tokens from {stage.init_from}'s "
                f"{parent.seq_length}, short of seq_length={stage.seq_length}; use factor "
                f"{stage.seq_length / parent.seq_length * trained_factor:g}",
            )


def _check_hf_init(cfg: TrainConfig, name: str, stage: StageConfig) -> None:
    """A stage started from a Hugging Face folder (continued pre-training): same family and shapes as the
    configured model, an explicit LR (a HF folder has no schedule to continue), and the checkpoint's own
    tokenizer, so token ids mean what the weights learned."""
    from models.hf import arch_from_hf, check_matches, is_hf_folder

    if not is_hf_folder(stage.init_from):
        return
    key = f"recipe.stages.{name}"
    import json

    with open(os.path.join(stage.init_from, "config.json")) as f:
        family, hf_arch = arch_from_hf(json.load(f))
    if family != cfg.model.family:
        raise ConfigError(
            "model.family", cfg.model.family, f"{key}.init_from={stage.init_from} is a {family} checkpoint"
        )
    check_matches(stage.arch(cfg.model.arch()), hf_arch)
    if stage.lr is None:
        raise ConfigError(f"{key}.lr", None, "a Hugging Face init_from has no LR to continue; set lr")
    if cfg.data.tokenizer.model_path is None:
        raise ConfigError(
            "data.tokenizer.model_path",
            None,
            f"{key}.init_from is a Hugging Face checkpoint: set its SentencePiece tokenizer "
            f"(e.g. {os.path.join(stage.init_from, 'tokenizer.model')}) so token ids match its embeddings",
        )
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=cfg.data.tokenizer.model_path).get_piece_size()
    if pieces > hf_arch.vocab_size:
        raise ConfigError(
            "data.tokenizer.model_path",
            cfg.data.tokenizer.model_path,
            f"has {pieces} pieces but {stage.init_from} embeds {hf_arch.vocab_size}; use the checkpoint's tokenizer",
        )


def _check_stability(name: str, stage: StageConfig, run: StabilityConfig) -> None:
    """The stage's stability settings are valid; rollback needs checkpoints within the stage to go back to."""
    key = f"recipe.stages.{name}"
    policy = for_stage(run, stage.stability, key=f"{key}.stability").policy
    if policy == "rollback" and not stage.save_every_tokens:
        raise ConfigError(
            f"{key}.save_every_tokens",
            stage.save_every_tokens,
            "stability.policy=rollback restores the stage's last checkpoint, and this stage saves none before "
            f"its end; set save_every_tokens (e.g. {max(1, stage.steps // 10) * stage.batch_tokens}) or use "
            "policy skip or stop",
        )


def validate(cfg: TrainConfig) -> None:
    if cfg.device not in DEVICES:
        raise ConfigError("device", cfg.device, f"choose one of {', '.join(DEVICES)}")
    if cfg.checkpoint.async_save and cfg.parallel.engine != "megatron":
        raise ConfigError(
            "checkpoint.async_save",
            True,
            f"parallel.engine={cfg.parallel.engine} saves synchronously (async saving is megatron-core's "
            "dist_checkpointing); set checkpoint.async_save=false or parallel.engine=megatron",
        )
    arch = cfg.model.arch()
    cfg.parallel.check_model(
        heads=arch.num_attention_heads,
        kv_heads=arch.num_kv_heads,
        layers=arch.num_layers,
        experts=arch.moe.num_experts if arch.moe is not None else 0,
    )
    stages = cfg.recipe.stages
    if not stages:
        raise ConfigError("recipe.stages", {}, "a recipe needs at least one stage")
    seen: list[str] = []
    for name, stage in stages.items():
        stage.validate(name)
        for src in stage.mix:
            if src not in cfg.data.sources:
                raise ConfigError(
                    f"recipe.stages.{name}.mix.{src}",
                    stage.mix[src],
                    f"no such data source; sources are {sorted(cfg.data.sources)}",
                )
        cfg.parallel.check_batch(
            key=f"recipe.stages.{name}.batch_tokens",
            sequences=stage.batch_sequences,
            seq_length=stage.seq_length,
        )
        if stage.batch_ramp and cfg.parallel.engine != "megatron":
            raise ConfigError(
                f"recipe.stages.{name}.batch_ramp",
                [list(e) for e in stage.batch_ramp],
                f"parallel.engine={cfg.parallel.engine} keeps one gradient accumulation for the whole run; use "
                "parallel.engine=megatron (its distributed optimizer is ZeRO-1) or remove the batch_ramp",
            )
        for phase in stage.plan():  # ramps: every batch and training length must fit the layout too
            cfg.parallel.check_batch(
                key=f"recipe.stages.{name}.batch_ramp",
                sequences=phase.samples_per_step,
                seq_length=phase.seq_length,
                seq_key=f"recipe.stages.{name}.seq_ramp",
            )
        if stage.init_from is not None and stage.init_from not in seen and not os.path.isdir(stage.init_from):
            raise ConfigError(
                f"recipe.stages.{name}.init_from",
                stage.init_from,
                f"name an earlier stage ({', '.join(seen) or 'none before this one'}) or an existing checkpoint directory",
            )
        _check_rope(name, stage, stages, arch)
        if stage.init_from is not None and stage.init_from not in seen:
            _check_hf_init(cfg, name, stage)
        _check_stability(name, stage, cfg.stability)
        if stage.lr is None and stage.init_from is None:
            raise ConfigError(
                f"recipe.stages.{name}.lr",
                None,
                "lr=null continues an init_from checkpoint's LR; set init_from or an lr",
            )
        seen.append(name)
    if cfg.only_stage is not None and cfg.only_stage not in stages:
        raise ConfigError(
            "only_stage", cfg.only_stage, f"choose one of the recipe's stages: {', '.join(stages)}"
        )
    for name, src in cfg.data.sources.items():
        if src.kind == "files":
            import glob

            for pattern in src.paths:
                if not glob.glob(os.path.expanduser(pattern), recursive=True):
                    raise ConfigError(
                        f"data.sources.{name}.paths",
                        pattern,
                        "matches no file; check the path (globs like data/*.jsonl work)",
                    )
