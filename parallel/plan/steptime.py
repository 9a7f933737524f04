"""Step time of a layout from a roofline: matmul FLOPs at an assumed (or measured) efficiency, plus the
communication each parallel axis adds, plus the pipeline bubble.

- Compute: model FLOPs (flops.py, Megatron convention) + recompute FLOPs (full: one more forward of the layers;
  selective: one more forward of the attention scores; Korthikanti et al. 2022, Sec. 5, Table 4), over
  world x peak x efficiency.
- Pipeline bubble: (p - 1) / (v m) of the compute for 1F1B with v virtual stages and m micro-batches
  (Narayanan et al. 2021, Sec. 2.2.1-2.2.2).
- Tensor parallel: per layer and micro-batch, 2 all-reduces forward and 2 backward of s b h activations
  (Shoeybi et al. 2019, Fig. 4; with sequence parallelism the same volume as all-gather + reduce-scatter,
  Korthikanti et al. Sec. 4.2.2), 2 more with full recompute; a ring all-reduce moves 2 (t-1)/t of the data
  per GPU. Not overlapped.
- Expert parallel: 4 all-to-alls per MoE layer and micro-batch (dispatch and combine, forward and backward),
  each moving top_k s b h (ep-1)/ep per GPU.
- Context parallel: ring attention passes K and V around the cp ranks, (cp-1) steps of the local K/V forward and
  twice that backward (Liu et al. 2023, Ring Attention); counted as not overlapped.
- Pipeline point-to-point: activations forward and gradients backward at each stage boundary, on the critical
  path (m + p - 1) times.
- Data parallel: reduce-scatter of bf16 grads + all-gather of bf16 weights with the distributed optimizer /
  ZeRO-1-2 (the volume of one all-reduce, 2 (d-1)/d x bytes), 1.5x that for ZeRO-3 (weights gathered in forward
  and backward, Rajbhandari et al. 2020, Sec. 7.2.2); overlapped with the backward pass (2/3 of the compute), only
  the excess is exposed.
Bandwidths: inside a node the cluster's intra_node_gbps, across nodes inter_node_gbps (per GPU, one direction).
Ranks are ordered TP, CP, EP/DP, PP (Megatron's default order): a group crosses nodes once the ranks it spans
exceed a node.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.plan.flops import as_plan_arch, flops_per_token, param_count
from parallel.plan.memory import Layout

BF16 = 2


@dataclass(frozen=True)
class Link:
    gpus_per_node: int
    intra_gbps: float
    inter_gbps: float

    def bandwidth(self, span: int) -> float:
        """Bytes/s per GPU of a group whose ranks span `span` consecutive ranks."""
        gbps = self.intra_gbps if span <= self.gpus_per_node else self.inter_gbps
        return gbps * 1e9


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    tp: float
    ep: float
    cp: float
    pp: float
    dp: float
    """Exposed (not overlapped) data-parallel communication."""
    model_flops: float
    """Model FLOPs of the step (MFU's numerator)."""
    peak: float
    """Peak FLOP/s of all GPUs of the layout."""

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp + self.ep + self.cp + self.pp + self.dp

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.peak * self.total)


def step_time(
    arch: object,
    layout: Layout,
    *,
    vocab_size: int,
    seq_length: int,
    batch_sequences: int,
    peak_flops: float,
    link: Link,
    efficiency: float = 0.55,
) -> StepTime:
    """Seconds per optimizer step of a global batch of `batch_sequences` sequences on `layout`."""
    a = as_plan_arch(arch)
    n = param_count(a, vocab_size=vocab_size)
    tokens = batch_sequences * seq_length
    model = flops_per_token(a, seq_length=seq_length, vocab_size=vocab_size) * tokens
    qk, v = a.score_dims
    scores = 6 * a.num_layers * (qk + v) * seq_length / 2 * tokens
    logits = 6 * vocab_size * a.hidden_size * tokens
    extra = {"none": 0.0, "selective": scores / 3, "full": (model - logits) / 3}[layout.recompute]
    world = layout.world
    compute = (model + extra) / (world * peak_flops * efficiency)

    m = max(1, batch_sequences // (layout.dp * layout.micro_batch))  # micro-batches per step per DP rank
    bubble = compute * (layout.pp - 1) / (layout.vpp * m) if layout.pp > 1 else 0.0

    s, b, h, t = seq_length // layout.cp, layout.micro_batch, a.hidden_size, layout.tp
    layers_per_stage = a.num_layers / layout.pp
    sbh_bytes = s * b * h * BF16
    tp = 0.0
    if t > 1:
        colls = 4 + (2 if layout.recompute == "full" else 0)
        tp = layers_per_stage * m * colls * 2 * (t - 1) / t * sbh_bytes / link.bandwidth(t)
    ep = 0.0
    if layout.ep > 1 and a.is_moe:
        moe_per_stage = a.moe_layers / layout.pp
        vol = a.top_k * sbh_bytes * (layout.ep - 1) / layout.ep
        ep = moe_per_stage * m * 4 * vol / link.bandwidth(t * layout.cp * layout.ep)
    cp = 0.0
    if layout.cp > 1:
        kv_width = a.kv_lora_rank if a.is_mla else 2 * a.num_kv_heads * a.head_size
        kv_bytes = s * b * kv_width * BF16 / t
        cp = layers_per_stage * m * 3 * (layout.cp - 1) * kv_bytes / link.bandwidth(t * layout.cp)
    pp = 0.0
    if layout.pp > 1:
        p2p = sbh_bytes / (t if layout.sp else 1)
        pp = (m + layout.pp - 1) * 2 * p2p / link.bandwidth(world)
    dp = 0.0
    d = layout.dp * layout.cp  # gradients are reduced over DP x CP
    if d > 1:
        block = n.total - n.embedding - n.output
        emb = n.embedding + (n.output if layout.pp == 1 else 0)  # the first stage; untied output on the last
        local = (block - n.experts) / layout.pp / t + n.experts / layout.pp / layout.ep + emb / t
        volume = (
            2 * (d - 1) / d * local * BF16 * (1.5 if layout.engine == "deepspeed" and layout.zero == 3 else 1)
        )
        raw = volume / link.bandwidth(world // layout.pp)
        dp = max(0.0, raw - 2 / 3 * compute)
    return StepTime(compute, bubble, tp, ep, cp, pp, dp, model, world * peak_flops)
