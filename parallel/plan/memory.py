"""Memory per GPU of a training layout: weights, gradients, optimizer state and activations.

Sources:
- Weights, grads and Adam state, megatron engine: Megatron-LM `megatron/training/theoretical_memory_usage.py`
  `compute_weight_and_optimizer_memory`: 18 bytes per parameter in bf16 mixed precision (2 bf16 weight + 4 fp32
  grad + 4 fp32 master weight + 4 + 4 Adam moments), 6 + 12/DP with the distributed optimizer (master weights and
  moments sharded over the data-parallel(-with-context-parallel) group); the most loaded shard is
  (layers/PP + embedding)/TP, plus the output layer when untied and PP = 1.
- Deepspeed engine: ZeRO (Rajbhandari et al. 2020, Sec. 5.1, Fig. 1): 2 bf16 weight + 2 bf16 grad + K = 12 optimizer
  bytes per parameter; stage 1 shards the 12 over DP, stage 2 also the grads, stage 3 also the weights.
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Sec. 4
  and Table 2 (bytes per layer; s sequence, b micro-batch, h hidden, a heads, t tensor-parallel size):
      no parallelism                      sbh (34 + 5as/h)
      tensor parallel (baseline)          sbh (10 + 24/t + 5as/(ht))
      tensor + sequence parallel          sbh/t (34 + 5as/h)
      tensor parallel + selective         sbh (10 + 24/t)
      tensor + sequence + selective       sbh (34/t)
      full recompute                      sbh (2)          (2sbh/t with sequence parallelism)
  `table2_layer_bytes` is that table verbatim; `layer_activation_bytes` itemizes the same terms for GQA, SwiGLU,
  MoE, MLA and no dropout, and equals Table 2 for the paper's GPT layer. The pipeline's first stage keeps
  min(PP, micro-batches) in flight (1F1B; x (1 + (p-1)/(p v)) interleaved) of L/p layers (Sec. 4.2.3), plus the
  embedding and output-layer terms of Megatron's `compute_activation_memory`.
Context parallelism splits the sequence: activations / CP.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.plan.flops import PlanArch, as_plan_arch, param_count
from train.errors import ConfigError

RECOMPUTE = ("none", "selective", "full")
ENGINES = ("megatron", "deepspeed")
GB = 1e9


def table2_layer_bytes(
    *, s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False, recompute: str = "none"
):
    """Korthikanti et al. 2022, Table 2: activation bytes of one GPT layer (16-bit activations, dropout masks)."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    scores = 5 * a * s / h if recompute == "none" else 0.0
    if sp:
        return sbh / t * (34 + scores)
    return sbh * (10 + 24 / t + scores / t)


@dataclass(frozen=True)
class Layout:
    """A candidate parallel layout (the planner's view; `parallel.layout.ParallelLayout` is what a run validates)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    """Expert-parallel size (MoE), inside the DP x TP ranks of a stage (Megatron: experts use TP=1 here)."""
    cp: int = 1
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B); 1 = not interleaved."""
    sp: bool = False
    micro_batch: int = 1
    engine: str = "megatron"
    zero: int = 1
    """ZeRO stage: megatron 0 (DDP) or 1 (distributed optimizer); deepspeed 0-3."""
    recompute: str = "none"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float
    margin: float
    """Allocator fragmentation and temporary buffers (communication buckets, logits in fp32)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.margin

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer


def layer_activation_bytes(
    arch: PlanArch,
    *,
    s: int,
    b: int,
    t: int,
    sp: bool,
    recompute: str,
    dropout: bool,
    flash: bool,
    moe: bool,
    act_bytes: int = 2,
    kernels: str = "fused",
) -> float:
    """Bytes one layer keeps for the backward: Korthikanti et al. Sec. 4.1's items, generalized.

    Per token, e = `act_bytes` per activation (2 in the paper) and 1-byte dropout masks. Attention (11sbh for
    GPT): the QKV input eh, Q e(ad), K and V e(kd) each, the output projection's input e(ad) and its dropout mask
    h; scores 5as (softmax output, mask, dropout output; e as without dropout; none with a fused/flash kernel).
    MLP (19sbh for GPT with 4h GELU): input eh, activation input ef (SwiGLU: gate and up, 2ef), the second GEMM's
    input ef, mask h. Two norm inputs eh each (4sbh). Replicated across TP without SP: norm inputs, QKV and MLP
    inputs and the two masks (10sbh); everything else is split over t.
    `kernels="local"`: megatron-core's local layer spec without fused kernels (the CPU path), measured with
    saved-tensor hooks: each RMSNorm also keeps its normalized output and 1/rms, attention keeps K and V expanded
    to all heads, and SwiGLU keeps silu(gate) and a copy besides gate and up (4ef).
    """
    e, h, mask = act_bytes, arch.hidden_size, (1 if dropout else 0)
    local = kernels == "local"
    if recompute == "full":
        return s * b * e * h / (t if sp else 1)
    qk, v = arch.score_dims
    if arch.is_mla:  # Q, K (width qk), V and the output projection's input (width v), the compressed latents
        attn_split = e * (2 * qk + 2 * v + arch.kv_lora_rank + arch.q_lora_rank)
    else:  # Q and the output projection's input (a d), K and V before GQA expansion (k d) unless local
        kd = qk if local else arch.num_kv_heads * arch.head_size
        attn_split = e * (qk + 2 * kd + v)
    if moe and arch.is_moe:  # each token goes through top_k routed experts and the shared ones
        f, routed = arch.top_k * arch.expert_ffn + arch.shared_expert_ffn_hidden_size, arch.top_k
    else:
        f, routed = arch.ffn_hidden_size, 0
    act_in = (
        e * f * ((4 if local else 2) if arch.gated_mlp else 1)
    )  # SwiGLU keeps gate and up; GELU its input
    mlp_split = act_in + e * f + e * h * routed  # activation input, W2 input, the dispatched token copies
    norm = e * h + ((e * h + e) if local else 0)  # input (+ normalized output and 1/rms)
    replicated = 2 * norm + e * h + e * h + 2 * mask * h  # norms, QKV input, MLP input, dropout masks
    score_bytes = (
        0.0
        if (recompute == "selective" or flash)
        else ((2 * e + 1) if dropout else e) * arch.num_attention_heads * s
    )
    per_token = (
        (replicated + attn_split + mlp_split + score_bytes) / t
        if sp
        else (replicated + (attn_split + mlp_split + score_bytes) / t)
    )
    return s * b * per_token


def gpt_arch(*, h: int, a: int, layers: int = 1) -> PlanArch:
    """The paper's GPT layer: multi-head attention, a 4h GELU MLP."""
    return PlanArch(layers, h, a, a, 4 * h, gated_mlp=False)


def state_bytes(
    params: float, *, dp: int, engine: str, zero: int, precision: str = "bf16"
) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes of `params` parameters data-parallel over `dp` ranks, with Adam:
    bf16 mixed precision, or fp32 (4 weight + 4 grad + 8 Adam moments: no separate master copy)."""
    if precision == "fp32":
        if engine == "megatron" and zero not in (0, 1):
            raise ConfigError(
                "parallel.zero", zero, "the megatron engine shards optimizer state only (zero 0 or 1)"
            )
        return (
            4 * params / (dp if zero >= 3 else 1),
            4 * params / (dp if zero >= 2 else 1),
            8 * params / (dp if zero >= 1 else 1),
        )
    if engine == "megatron":  # 2 bf16 weight + 4 fp32 main grad + 12 fp32 master/Adam (6 + 12/DP sharded)
        if zero not in (0, 1):
            raise ConfigError(
                "parallel.zero", zero, "the megatron engine shards optimizer state only (zero 0 or 1)"
            )
        return 2 * params, 4 * params, 12 * params / (dp if zero == 1 else 1)
    if zero not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero", zero, "DeepSpeed ZeRO stages are 0, 1, 2, 3")
    # ZeRO: 2 + 2 + K=12; stage k shards the first k of (optimizer state, grads, weights) over DP.
    return (
        2 * params / (dp if zero >= 3 else 1),
        2 * params / (dp if zero >= 2 else 1),
        12 * params / (dp if zero >= 1 else 1),
    )


def memory_per_gpu(
    arch: object,
    layout: Layout,
    *,
    vocab_size: int,
    seq_length: int,
    num_microbatches: int,
    dropout: bool = False,
    flash_attention: bool = True,
    margin: float = 0.10,
    precision: str = "bf16",
    kernels: str = "fused",
) -> Memory:
    """Peak bytes on the most loaded GPU (the first pipeline stage, which also holds the embedding).

    `precision`: bf16 mixed precision (GPU runs) or fp32 (CPU runs); `kernels`: fused (TransformerEngine /
    Apex / flash, GPU) or local (megatron-core's local spec unfused, the CPU path); see layer_activation_bytes."""
    a = as_plan_arch(arch)
    if layout.recompute not in RECOMPUTE:
        raise ConfigError("plan.recompute", layout.recompute, f"choose one of {', '.join(RECOMPUTE)}")
    if layout.engine not in ENGINES:
        raise ConfigError("parallel.engine", layout.engine, f"choose one of {', '.join(ENGINES)}")
    n = param_count(a, vocab_size=vocab_size)
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    block = n.total - n.embedding - n.output  # transformer layers + final norm
    dense_block = block - n.experts
    emb = n.embedding / tp + (n.output / tp if (pp == 1 and n.output) else 0)
    dense_params = dense_block / pp / tp + emb
    expert_params = n.experts / pp / ep  # experts are split over EP (expert TP = 1)
    dp_shard = layout.dp * layout.cp  # Megatron shards the optimizer over DP x CP
    edp = max(
        1, layout.dp * layout.cp * tp // ep
    )  # expert data-parallel size (Megatron: world / (EP x ETP x PP))
    st = {"engine": layout.engine, "zero": layout.zero, "precision": precision}
    w1, g1, o1 = state_bytes(dense_params, dp=dp_shard, **st)
    w2, g2, o2 = state_bytes(expert_params, dp=edp, **st)
    e = 4 if precision == "fp32" else 2

    s_local, b = seq_length // layout.cp, layout.micro_batch
    layers_per_stage = a.num_layers / pp
    kw = {
        "s": s_local,
        "b": b,
        "t": tp,
        "sp": layout.sp,
        "recompute": layout.recompute,
        "dropout": dropout,
        "flash": flash_attention,
        "act_bytes": e,
        "kernels": kernels,
    }
    dense_layers = a.num_layers - a.moe_layers
    per_layer = (
        dense_layers * layer_activation_bytes(a, moe=False, **kw)
        + a.moe_layers * layer_activation_bytes(a, moe=True, **kw)
    ) / a.num_layers
    in_flight = min(pp, num_microbatches) if pp > 1 else 1
    sb = s_local * b
    # Megatron compute_activation_memory: token ids (int64) and the embedding dropout mask of the in-flight
    # micro-batches, the interleaving penalty on all of it, then the output layer (last stage = first when PP = 1).
    extra = 8 * sb * in_flight + (sb * a.hidden_size * in_flight if dropout else 0)
    acts = per_layer * layers_per_stage * in_flight + extra / (tp if layout.sp else 1)
    if layout.vpp > 1 and pp > 1:
        acts *= 1 + (pp - 1) / (pp * layout.vpp)
    if pp == 1:
        # Final norm input, output GEMM input and the fp32 logits the cross-entropy keeps: Megatron's
        # 4sbh(1 + v/h) at e = 2 (vocab-parallel); a local norm also keeps its output and 1/rms.
        h = a.hidden_size
        norm = e * h + ((e * h + e) if kernels == "local" else 0)
        acts += sb * (norm + e * h + 4 * vocab_size) / tp
    weights, grads, opt = w1 + w2, g1 + g2, o1 + o2
    return Memory(weights, grads, opt, acts, margin * (weights + grads + opt + acts))
