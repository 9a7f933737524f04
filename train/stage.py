"""A recipe's stage (`configs/stage/`, `recipe.stages.<name>`): its tokens, batch and ramps, schedule, RoPE
changes, data mix, evaluation and checkpoint cadence; validated on its own (`StageConfig.validate`) and against
the stage it starts from (`check_rope`). train/config.py holds the rest of the schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.arch import Arch
from train.errors import ConfigError
from train.ramp import Phase, crossings, is_boundary, phases
from train.schedule import SCHEDULES, WSD_DECAY_STYLES

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


def check_rope(name: str, stage: StageConfig, stages: dict[str, StageConfig], model: Arch) -> None:
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
