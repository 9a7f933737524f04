"""A Llama-style shape (depth, width, heads, KV heads, FFN) with a given parameter count.

Rules, from the Llama 3 family (Dubey et al. 2024, Table 3): head dim 128 (64 below width 128*4), 8 KV heads
(fewer when there are fewer heads), SwiGLU FFN of 1.3 x (8/3) h rounded up to a multiple, and an aspect ratio
width / depth near 128 (8B: 4096/32 = 128, 70B: 8192/80 = 102, 405B: 16384/126 = 130).
"""

from __future__ import annotations

import math

from models.arch import Arch
from models.llama import llama_ffn_size
from parallel.plan.flops import PlanArch, param_count
from train.errors import ConfigError

TOLERANCE = 0.02  # the shape's parameter count is within 2% of the target


def _shape(layers: int, hidden: int, *, kv_heads: int, ffn_multiplier: float, ffn_multiple: int) -> Arch:
    head_dim = 128 if hidden >= 512 and hidden % 128 == 0 else 64
    heads = hidden // head_dim
    kv = max(k for k in range(1, min(kv_heads, heads) + 1) if heads % k == 0)
    # Small widths round the FFN to 64 so that a few-M-parameter target can still be hit within 2%.
    ffn = llama_ffn_size(
        hidden, multiplier=ffn_multiplier, multiple_of=ffn_multiple if hidden >= 1024 else 64
    )
    return Arch(layers, hidden, heads, kv, ffn)


def smallest_params(vocab_size: int) -> int:
    """Parameters of the smallest shape (1 layer, width 64) at this vocabulary: the floor of any plan."""
    return param_count(
        _shape(1, 64, kv_heads=8, ffn_multiplier=1.3, ffn_multiple=256), vocab_size=vocab_size
    ).total


def llama_shape(
    n_params: float,
    *,
    vocab_size: int,
    aspect_ratio: float = 128.0,
    kv_heads: int = 8,
    ffn_multiplier: float = 1.3,
    ffn_multiple: int = 256,
    tolerance: float = TOLERANCE,
) -> Arch:
    """The shape whose total parameter count (embedding and LM head included) is within `tolerance` (2%) of
    `n_params`, closest to `aspect_ratio` among those."""
    smallest = param_count(
        _shape(1, 64, kv_heads=kv_heads, ffn_multiplier=ffn_multiplier, ffn_multiple=ffn_multiple),
        vocab_size=vocab_size,
    ).total
    if n_params < smallest:
        raise ConfigError(
            "plan.n_params",
            f"{n_params:.3g}",
            f"below the smallest Llama shape at vocab {vocab_size} ({smallest:.3g} parameters: 1 layer, width 64); "
            "raise the budget or use a smaller vocabulary",
        )

    def total(layers: int, hidden: int) -> tuple[int, Arch]:
        arch = _shape(
            layers, hidden, kv_heads=kv_heads, ffn_multiplier=ffn_multiplier, ffn_multiple=ffn_multiple
        )
        return param_count(arch, vocab_size=vocab_size).total, arch

    # Steps of 64 below 1024, of one 128-wide head above, keeping widths whose head count has a KV-head
    # count between 4 and `kv_heads` (no 17-head MQA shapes).
    all_widths = [*range(64, 1024, 64)] + [
        w
        for w in range(1024, 65_537, 128)
        if _shape(1, w, kv_heads=kv_heads, ffn_multiplier=1, ffn_multiple=64).num_kv_heads >= min(4, kv_heads)
    ]
    best: tuple[float, float, float, Arch] | None = None
    for layers in range(1, 257):
        widths = [w for w in all_widths if aspect_ratio / 4 <= w / layers <= aspect_ratio * 4]
        if not widths:
            continue
        # The count grows with width: bisect for the first width at or above the target, keep it and the one below.
        lo, hi = 0, len(widths) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if total(layers, widths[mid])[0] < n_params else (lo, mid)
        for hidden in widths[max(0, lo - 1) : lo + 1]:
            count, arch = total(layers, hidden)
            err = abs(count - n_params) / n_params
            # Within tolerance, prefer the full KV-head count, then the aspect ratio nearest the target.
            key = (
                0.0 if err <= tolerance else err,
                float(arch.num_kv_heads != min(kv_heads, arch.num_attention_heads)),
                abs(math.log(hidden / layers / aspect_ratio)),
            )
            if best is None or key < best[:3]:
                best = (*key, arch)
    assert best is not None
    if best[0] > 0:
        raise ConfigError(
            "plan.n_params",
            f"{n_params:.3g}",
            f"no Llama shape within {tolerance:.0%} at aspect ratio {aspect_ratio:g} x/÷ 4; nearest is "
            f"{param_count(best[3], vocab_size=vocab_size).total:.3g} ({best[3]})",
        )
    return best[3]


def moe_shape(
    n_active: float, *, vocab_size: int, num_experts: int, top_k: int, aspect_ratio: float = 128.0
) -> PlanArch:
    """A fine-grained MoE whose ACTIVE parameter count is within 2% of `n_active`: the dense shape for
    `n_active`, its MLP split into experts of width ffn / top_k (so top_k of them cost the dense MLP's FLOPs,
    DeepSeekMoE's fine-grained segmentation, Dai et al. 2024, Sec. 3.1), `num_experts` of them per layer."""
    if num_experts < 2 or not 1 <= top_k < num_experts:
        raise ConfigError(
            "plan.num_experts",
            num_experts,
            f"an MoE needs >= 2 experts and 1 <= top_k < experts (top_k={top_k})",
        )
    dense = llama_shape(n_active, vocab_size=vocab_size, aspect_ratio=aspect_ratio)

    def build(width: int) -> PlanArch:
        return PlanArch(
            dense.num_layers,
            dense.hidden_size,
            dense.num_attention_heads,
            dense.num_kv_heads,
            dense.ffn_hidden_size,
            head_dim=dense.head_dim,
            num_experts=num_experts,
            top_k=top_k,
            moe_ffn_hidden_size=width,
        )

    # Expert widths a multiple of 64 just below and above ffn / top_k: keep the one nearer the target.
    lo = max(64, 64 * int(dense.ffn_hidden_size / top_k // 64))
    shapes = [build(lo), build(lo + 64)]
    return min(shapes, key=lambda a: abs(param_count(a, vocab_size=vocab_size).active - n_active))
