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
from models.fusions import Fusions, fusion_choice, resolve_fusions
from models.registry import resolve_arch
from parallel.layout import ParallelLayout
from train.checkpoint import CheckpointConfig, ResumeConfig
from train.errors import ConfigError
from train.stability import StabilityConfig, for_stage
from train.stage import StageConfig, check_rope

WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")


# ----------------------------------------------------------------------------------------------- data
# The data group's schema (DataConfig, SourceConfig, TokenizerConfig, ...) lives in data/config.py.


# ---------------------------------------------------------------------------------------------- model
@dataclass
class FusionConfig:
    """Fused and compiled kernels (models/fusions.py); each auto, true or false. They change how the model is
    computed, never its parameters or checkpoints. auto = what is exact and not slower on the run's device."""

    norm: str = "auto"
    """RMSNorm through torch's fused F.rms_norm kernel. auto: on (bitwise equal in fp32 on CPU, faster)."""
    activation: str = "auto"
    """SwiGLU/GeGLU through megatron-core's bias_activation_fusion (torch.compile'd). auto: on with CUDA, off on
    CPU (slower there, and seconds of compile per process)."""
    cross_entropy: str = "auto"
    """megatron-core's fused vocab-parallel cross-entropy (native), gradient kept in the logits' dtype. auto: on
    with CUDA, off on CPU (seconds of compile per process for a few percent)."""
    compile: str = "false"
    """torch.compile each transformer layer (torchtitan style). Not bitwise (~3e-6 rel in fp32 gradients), and
    the first step compiles; auto = false until it is measured on a GPU."""

    def __post_init__(self) -> None:
        for kernel in ("norm", "activation", "cross_entropy", "compile"):
            fusion_choice(kernel, getattr(self, kernel))

    def resolve(self, device_type: str) -> Fusions:
        """The kernels to run on `device_type` (cpu or cuda)."""
        return resolve_fusions(device_type, **vars(self))


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
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Fused/compiled kernels: `model.fusion.{norm,activation,cross_entropy,compile}=auto|true|false`."""

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


_NOT_ARCH = ("family", "size", "extra", "attention_backend", "fusion")


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
        check_rope(name, stage, stages, arch)
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
