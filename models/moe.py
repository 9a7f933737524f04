"""Expert-load statistics from megatron-core's TopKRouter: the one implementation of expert load in Kiln.

`track_expert_load(model)` (called by `build_model` for MoE models) hooks every router to add up, per MoE layer,
how many tokens were routed to each expert (top-k assignments, counted on this rank) since the last read.
`expert_load_stats(model)` turns the counts into logging keys and resets them:

- `moe/layer{i}/min`, `moe/layer{i}/max`: the least and most loaded expert's share of assignments times the number
  of experts (1.0 everywhere = perfectly balanced; max = E means one expert took everything);
- `moe/layer{i}/entropy`: entropy of the load distribution over log(E) (1.0 = uniform, 0 = one expert);
- `moe/max`: the largest `max` over layers.
`i` is the 0-based global layer index.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_COUNTS = "_kiln_tokens_per_expert"


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for module in model.modules():
        if isinstance(module, TransformerLayer) and isinstance(module.mlp, MoELayer):
            yield module.layer_number - 1, module.mlp.router


def _count(router, _inputs, output) -> None:
    _, routing_map = output  # (tokens, experts) bool: the top-k choice of each token
    counts = getattr(router, _COUNTS)
    if counts.device != routing_map.device:
        counts = counts.to(routing_map.device)
        setattr(router, _COUNTS, counts)
    counts += routing_map.detach().sum(dim=0).to(counts.dtype)


def track_expert_load(model) -> int:
    """Hook every MoE router of `model` (idempotent); returns the number of MoE layers."""
    n = 0
    for _, router in _moe_layers(model):
        if not hasattr(router, _COUNTS):
            setattr(router, _COUNTS, torch.zeros(router.config.num_moe_experts, dtype=torch.float64))
            router.register_forward_hook(_count)
        n += 1
    return n


def load_summary(counts: torch.Tensor) -> tuple[float, float, float]:
    """(min share x E, max share x E, entropy / log E) of per-expert token counts."""
    counts = counts.double()
    e = counts.numel()
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    share = counts / total
    nonzero = share[share > 0]
    entropy = -(nonzero * nonzero.log()).sum().item() / math.log(e) if e > 1 else 1.0
    return (share.min() * e).item(), (share.max() * e).item(), entropy


def expert_load_stats(model, *, reset: bool = True, group=None) -> dict[str, float]:
    """Per-layer load keys since the last call (see module doc). `group`: also sum the counts over this process
    group (e.g. data-parallel) first - a collective, so every rank of it must call."""
    out: dict[str, float] = {}
    worst = 0.0
    for index, router in sorted(_moe_layers(model), key=lambda x: x[0]):
        counts = getattr(router, _COUNTS, None)
        if counts is None:
            continue
        total = counts.clone()
        if group is not None and dist.is_initialized():
            dist.all_reduce(total, group=group)
        low, high, entropy = load_summary(total)
        out[f"moe/layer{index}/min"], out[f"moe/layer{index}/max"] = low, high
        out[f"moe/layer{index}/entropy"] = entropy
        worst = max(worst, high)
        if reset:
            counts.zero_()
    if out:
        out["moe/max"] = worst
    return out
