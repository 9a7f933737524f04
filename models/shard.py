"""Tensor/expert-parallel shards <-> full tensors, for HF conversion of a model built at any TP/EP.

megatron-core tags each split parameter with `tensor_model_parallel` and `partition_dim`; expert parameters
(`allreduce == False`) are split over the expert-TP group and spread over the expert-parallel group
(`local_experts.{j}` on EP rank r is expert r * local + j). Gated-MLP inputs hold [gate; up] per shard, so their
shards are cut from gate and up separately.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def _groups(param):
    from megatron.core import parallel_state as ps

    if getattr(param, "allreduce", True) is False:  # an expert parameter
        return ps.get_expert_tensor_parallel_group(), ps.get_expert_model_parallel_group()
    return ps.get_tensor_model_parallel_group(), None


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _is_glu(key: str) -> bool:
    return key.endswith("linear_fc1.weight")  # every Kiln MLP is gated (SwiGLU/GeGLU)


def _is_vocab(key: str) -> bool:
    return key in ("embedding.word_embeddings.weight", "output_layer.weight")


def _cut(full: torch.Tensor, key: str, dim: int, parts: int, index: int) -> torch.Tensor:
    if _is_glu(key):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(parts, dim=dim)[index], up.chunk(parts, dim=dim)[index]], dim=dim)
    return full.chunk(parts, dim=dim)[index]


def local_key(model, key: str) -> str | None:
    """The local key of global expert key `key` on this EP rank, or None if another rank holds it."""
    m = _EXPERT.match(key)
    if m is None:
        return key
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size()
    local = model.arch.moe.num_experts // ep
    e = int(m.group(2))
    if e // local != ps.get_expert_model_parallel_rank():
        return None
    return f"{m.group(1)}{e % local}{m.group(3)}"


def shard_for_rank(model, key: str, full: torch.Tensor) -> torch.Tensor | None:
    """This rank's piece of the full tensor `key` (global expert numbering), or None if held elsewhere. Vocabulary
    tensors are padded with zero rows to the model's padded vocabulary first."""
    params = dict(model.named_parameters())
    own = local_key(model, key)
    if own is None:
        return None
    param = params.get(own)
    if param is None or not getattr(param, "tensor_model_parallel", False):
        return full
    tp_group, _ = _groups(param)
    parts, dim = _size(tp_group), param.partition_dim
    if _is_vocab(key):
        rows = param.shape[0] * parts
        full = (
            torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
            if rows > full.shape[0]
            else full
        )
    return _cut(full, key, dim, parts, _rank(tp_group))


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def join_shards(key: str, pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The full tensor `key` from its tensor-parallel shards in rank order (split along `dim`); a gated-MLP
    input's shards each hold [gate; up], so the gates are joined, then the ups."""
    if _is_glu(key):
        halves = [p.chunk(2, dim=dim) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(pieces, dim=dim)


def full_state_dict(model, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's parameters (or, with `grads`, their .grad) as full tensors (TP shards joined, experts
    under their global index), on every rank. Collective over the TP and EP groups: every rank must call it."""
    out: dict[str, torch.Tensor] = {}
    for key, param in model.named_parameters():
        t = (
            param.detach()
            if not grads
            else (param.grad if param.grad is not None else torch.zeros_like(param))
        )
        tp_group, ep_group = _groups(param)
        if getattr(param, "tensor_model_parallel", False) and _size(tp_group) > 1:
            t = join_shards(key, _gather(t, tp_group), param.partition_dim)
        m = _EXPERT.match(key)
        if m is not None:
            ep = _size(ep_group)
            local = model.arch.moe.num_experts // ep
            pieces = _gather(t, ep_group) if ep > 1 else [t]
            for r, piece in enumerate(pieces):
                out[f"{m.group(1)}{r * local + int(m.group(2))}{m.group(3)}"] = piece
            continue
        out[key] = t
    return out
