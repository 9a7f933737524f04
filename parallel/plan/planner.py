"""From a budget and a cluster to a whole plan: model size and shape, tokens, batch and LR, layout, memory, time.

`plan(request, cluster)` composes the pure functions of this package; `PlanConfig` is the schema of the `plan`
Hydra group (configs/plan/*.yaml) and `format_plan` prints the result as tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from parallel.plan.flops import ParamCount, PlanArch, as_plan_arch, flops_per_token, param_count
from parallel.plan.hardware import budget_from_gpu_hours, device
from parallel.plan.hparams import PLAN_SCHEDULES, Hparams, hparams, non_embedding_flops_per_token
from parallel.plan.laws import EPOCH, LAWS, ParametricLaw, Sizing, compute_optimal, overtrained
from parallel.plan.search import Candidate, SearchResult, search
from parallel.plan.shape import llama_shape, moe_shape, smallest_params
from parallel.plan.steptime import Link
from train.errors import ConfigError


@dataclass
class PlanConfig:
    """A planning request (configs/plan/*.yaml): a budget, what to size by, and the run's fixed choices."""

    name: str = "plan"
    """Name of the generated config (configs/generated/<name>.yaml) and of its recipe."""
    flops: float | None = None
    """Training budget in FLOPs (C = 6 N D); or set gpu_hours."""
    gpu_hours: float | None = None
    """Budget as GPU-hours of cluster.gpu at `mfu` (used when flops is null)."""
    mfu: float = 0.4
    """Assumed model-FLOPs utilization that converts gpu_hours into FLOPs."""
    law: str = "epoch"
    """Compute-optimal law: epoch (Besiroglu et al. 2024), chinchilla, chinchilla_approach1, llama3."""
    fitted_law: str | None = None
    """A fit.json written by `python -m parallel.plan.fit`: its parametric L(N, D) replaces `law`."""
    tokens_per_param: float | None = None
    """Over-train at this many tokens per parameter instead (Llama 3 8B: ~1,900)."""
    n_params: float | None = None
    """Fix the model size (parameters; active parameters for MoE); tokens = budget / (6 N)."""
    num_experts: int = 0
    """> 0: a fine-grained MoE with this many experts per layer (N is then the active count)."""
    top_k: int = 2
    vocab_size: int = 128_256
    seq_length: int = 8192
    schedule: str = "cosine"
    """cosine (to 10% of the peak) or wsd (20% 1-sqrt cool-down)."""
    nodes: int | None = None
    """Nodes to use; null = the fewest (powers of two up to cluster.max_nodes) that finish within max_days."""
    max_days: float = 30.0
    efficiency: float = 0.55
    """Fraction of the peak FLOP/s matmuls reach (measure it: bench/; 0.5-0.6 on H100 with bf16)."""
    engine: str = "megatron"
    flash_attention: bool | None = None
    """Attention kernels that keep no score matrix; null = true on GPUs, false on cpu."""
    top: int = 8
    """Layouts shown in the table."""
    out_dir: str = "configs/generated"


@dataclass(frozen=True)
class Plan:
    request: PlanConfig
    cluster_name: str
    gpu: str
    flops: float
    sizing: Sizing
    arch: PlanArch
    params: ParamCount
    hp: Hparams
    nodes: int
    world: int
    result: SearchResult
    loss: float | None = None
    notes: list[str] = field(default_factory=list)
    hp_flops: float = 0.0
    """DeepSeek's C = M x D the batch and LR laws were evaluated at."""

    @property
    def best(self) -> Candidate:
        return self.result.fits[0]

    @property
    def days(self) -> float:
        return self.hp.steps * self.best.time.total / 86400

    @property
    def gpu_hours(self) -> float:
        return self.days * 24 * self.world


def load_fitted_law(path: str) -> ParametricLaw:
    import json

    try:
        with open(path) as f:
            p = json.load(f)["parametric"]
        return ParametricLaw(E=p["E"], A=p["A"], B=p["B"], alpha=p["alpha"], beta=p["beta"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(
            "plan.fitted_law", path, f"need a fit.json from `python -m parallel.plan.fit` ({e})"
        ) from e


def size(req: PlanConfig, flops: float) -> Sizing:
    if req.n_params is not None:
        n = req.n_params
        return Sizing("fixed N", flops, n, flops / (6 * n), EPOCH.loss(n, flops / (6 * n)))
    if req.tokens_per_param is not None:
        return overtrained(flops, tokens_per_param=req.tokens_per_param)
    if req.fitted_law is not None:
        law = load_fitted_law(req.fitted_law)
        n, d = law.optimal(flops)
        return Sizing(f"fitted ({req.fitted_law})", flops, n, d, law.loss(n, d))
    if req.law not in LAWS:
        raise ConfigError("plan.law", req.law, f"choose one of {', '.join(LAWS)}")
    return compute_optimal(flops, law=req.law)


def budget(req: PlanConfig, gpu: str) -> float:
    if req.flops is not None:
        if not req.flops > 0:
            raise ConfigError(
                "plan.flops", req.flops, "the budget must be a positive number of FLOPs, e.g. 1e21"
            )
        return req.flops
    if req.gpu_hours is None:
        raise ConfigError("plan.flops", None, "give a budget: plan.flops=1e21 or plan.gpu_hours=10000")
    return budget_from_gpu_hours(req.gpu_hours, gpu=gpu, mfu=req.mfu)


def _shape(req: PlanConfig, n: float, notes: list[str], flops: float) -> PlanArch:
    try:
        if req.num_experts:
            return moe_shape(n, vocab_size=req.vocab_size, num_experts=req.num_experts, top_k=req.top_k)
        try:
            return as_plan_arch(llama_shape(n, vocab_size=req.vocab_size))
        except ConfigError as e:
            if "no Llama shape within" not in e.fix:
                raise
            # Tiny models have coarse steps (one layer or 64 of width is several %): take the nearest within 10%.
            notes.append(f"no shape within 2% of {n:.3g} parameters; the nearest within 10% is used")
            return as_plan_arch(llama_shape(n, vocab_size=req.vocab_size, tolerance=0.10))
    except ConfigError as e:
        if "below the smallest" not in e.fix:
            raise
        smallest = smallest_params(req.vocab_size)
        raise ConfigError(
            "plan.flops",
            f"{flops:.3g}",
            f"the budget sizes a {n:.3g}-parameter model, below the smallest shape at vocab {req.vocab_size} "
            f"({smallest:.3g}); the nearest feasible plan needs >= {6 * 20 * smallest**2:.3g} FLOPs "
            f"(20 tokens per parameter), or a smaller vocab_size",
        ) from e


def plan(req: PlanConfig, *, cluster_name: str, gpu: str, gpus_per_node: int, max_nodes: int,
         intra_node_gbps: float = 0.0, inter_node_gbps: float = 0.0) -> Plan:  # fmt: skip
    """The whole plan for `req` on a cluster (the fields of train.config.ClusterConfig)."""
    dev = device(gpu)
    if req.schedule not in PLAN_SCHEDULES:
        raise ConfigError("plan.schedule", req.schedule, f"choose one of {', '.join(PLAN_SCHEDULES)}")
    if not 0 < req.efficiency <= 1:
        raise ConfigError("plan.efficiency", req.efficiency, "a fraction in (0, 1], e.g. 0.55")
    flops = budget(req, gpu)
    sizing = size(req, flops)
    notes: list[str] = []
    arch = _shape(req, sizing.n_params, notes, flops)
    params = param_count(arch, vocab_size=req.vocab_size)
    n = params.active
    # The run trains D = C / (6 N) tokens of the SHAPE's N (within 2% of the law's).
    tokens = flops / (6 * n)
    m_flops = (
        non_embedding_flops_per_token(arch, seq_length=req.seq_length, vocab_size=req.vocab_size) * tokens
    )
    link = Link(gpus_per_node, intra_node_gbps or dev.intra_node_gbps, inter_node_gbps or dev.inter_node_gbps)
    flash = req.flash_attention if req.flash_attention is not None else gpu != "cpu"
    hp0 = hparams(flops=m_flops, tokens=tokens, seq_length=req.seq_length, schedule=req.schedule)

    def run_search(nodes: int) -> SearchResult:
        return search(
            arch,
            vocab_size=req.vocab_size,
            seq_length=req.seq_length,
            batch_tokens=hp0.batch_tokens,
            world=nodes * gpus_per_node,
            gpus_per_node=gpus_per_node,
            memory_limit=dev.memory_bytes,
            peak_flops=dev.peak["bf16"],
            link=link,
            efficiency=req.efficiency,
            engine=req.engine,
            flash_attention=flash,
        )

    if req.nodes is not None:
        if not 1 <= req.nodes <= max_nodes:
            raise ConfigError(
                "plan.nodes", req.nodes, f"the cluster has 1..{max_nodes} nodes (cluster.max_nodes)"
            )
        options = [req.nodes]
    else:
        options = sorted({2**k for k in range(int(math.log2(max_nodes)) + 1)} | {max_nodes})
    chosen: tuple[int, SearchResult] | None = None
    for nodes in options:
        result = run_search(nodes)
        chosen = (nodes, result)
        if result.fits:
            steps = tokens / result.fits[0].batch_sequences / req.seq_length
            if steps * result.fits[0].time.total / 86400 <= req.max_days:
                break
    assert chosen is not None
    nodes, result = chosen
    if not result.fits:
        near = result.nearest
        hint = (
            f"nearest: {describe(near.layout)} at {near.memory.total / 1e9:.1f} GB"
            if near
            else "no valid layout"
        )
        raise ConfigError(
            "plan.nodes",
            nodes,
            f"no layout of {arch.num_layers}x{arch.hidden_size} ({params.total / 1e9:.3g}B parameters) fits "
            f"{dev.memory_gb:g} GB per {gpu} on {nodes} node(s) of {gpus_per_node}; {hint}. Use more nodes "
            f"(cluster.max_nodes={max_nodes}), a GPU with more memory, or a smaller budget",
        )
    best = result.fits[0]
    hp = hparams(
        flops=m_flops,
        tokens=tokens,
        seq_length=req.seq_length,
        schedule=req.schedule,
        batch_multiple=best.layout.dp * best.layout.micro_batch,
    )
    if hp.batch_sequences != best.batch_sequences:
        notes.append(f"batch {best.batch_sequences} sequences searched, {hp.batch_sequences} planned")
    return Plan(req, cluster_name, gpu, flops, sizing, arch, params, hp, nodes, nodes * gpus_per_node, result,
                sizing.loss, notes, m_flops)  # fmt: skip


def tokens_str(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def describe(layout) -> str:
    parts = [f"tp{layout.tp}", f"pp{layout.pp}", f"dp{layout.dp}"]
    parts += [f"{k}{getattr(layout, k)}" for k in ("ep", "cp", "vpp") if getattr(layout, k) > 1]
    parts += [f"mb{layout.micro_batch}", layout.recompute]
    if layout.engine != "megatron" or layout.zero != 1:
        parts.append(f"{layout.engine} zero{layout.zero}")
    return " ".join(parts)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_plan(p: Plan) -> str:
    a, n, hp, best = p.arch, p.params, p.hp, p.best
    fpt = flops_per_token(a, seq_length=p.request.seq_length, vocab_size=p.request.vocab_size)
    model = (
        f"{a.num_layers} layers, d {a.hidden_size}, {a.num_attention_heads} heads / {a.num_kv_heads} kv, ffn "
    )
    model += (
        f"{a.ffn_hidden_size}" if not a.is_moe else f"{a.num_experts} x {a.expert_ffn} experts, top-{a.top_k}"
    )
    summary = [
        ["", "plan"],
        ["budget", f"{p.flops:.3g} FLOPs ({p.sizing.law})"],
        [
            "model",
            f"{n.total / 1e9:.4g}B parameters" + (f" ({n.active / 1e9:.4g}B active)" if a.is_moe else ""),
        ],
        ["shape", model],
        ["tokens", f"{tokens_str(hp.tokens)} ({hp.tokens / n.active:.1f} per parameter)"],
        ["loss", f"{p.loss:.3f} nats/token (predicted)" if p.loss is not None else "-"],
        ["batch", f"{hp.batch_sequences} x {p.request.seq_length} = {tokens_str(hp.batch_tokens)} tokens"],
        [
            "lr",
            f"{hp.lr:.3g} -> {hp.min_lr:.3g} ({hp.schedule}), warm-up {tokens_str(hp.warmup_tokens)} tokens",
        ],
        ["FLOPs/token", f"{fpt:.4g} (6N = {6 * n.active:.4g})"],
        ["cluster", f"{p.nodes} node(s) x {p.world // p.nodes} {p.gpu} ({p.cluster_name})"],
        ["layout", describe(best.layout)],
        ["memory/GPU", f"{best.memory.total / 1e9:.1f} GB of {p.result.memory_limit / 1e9:g}"],
        ["step", f"{best.time.total:.3g} s, {hp.steps} steps, MFU {best.time.mfu:.1%}"],
        ["time", f"{p.days:.3g} days, {p.gpu_hours:.4g} GPU-hours"],
    ]
    rows = [
        ["layout", "batch", "weights", "grads", "optim", "acts", "total GB", "step s", "tok/s/GPU", "MFU"]
    ]
    for c in p.result.fits[: p.request.top]:
        m = c.memory
        rows.append([
            describe(c.layout), str(c.batch_sequences), f"{m.weights / 1e9:.1f}", f"{m.grads / 1e9:.1f}",
            f"{m.optimizer / 1e9:.1f}", f"{m.activations / 1e9:.1f}", f"{m.total / 1e9:.1f}",
            f"{c.time.total:.3g}", f"{c.tokens_per_s / p.world:.4g}", f"{c.time.mfu:.1%}",
        ])  # fmt: skip
    tail = f"{len(p.result.fits)} of {p.result.tried} layouts fit"
    return "\n\n".join([_table(summary), _table(rows), tail, *p.notes])


def config_choice(p: Plan) -> tuple[Candidate | None, Hparams | None, str | None]:
    """The fastest candidate the run's schema can take, its hyperparameters, and why the best one could not
    be written (None when it is the best)."""
    from parallel.plan.emit import writable

    first_why = None
    for c in p.result.fits:
        why = writable(p, c)
        if why is None:
            hp = hparams(
                flops=p.hp_flops,
                tokens=p.hp.tokens,
                seq_length=p.request.seq_length,
                schedule=p.request.schedule,
                batch_multiple=c.layout.dp * c.layout.micro_batch,
            )
            return c, hp, first_why
        first_why = first_why or why
    return None, None, first_why
