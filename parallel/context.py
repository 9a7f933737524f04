"""Context parallelism without TransformerEngine: all-gather K/V attention (Dubey et al. 2024, "The Llama 3 Herd
of Models", sec. 3.3.2: each CP rank all-gathers the keys and values, then computes its local queries' attention).

megatron-core's sequence layout (`megatron.core.utils.get_batch_on_this_cp_rank`): the sequence is cut into
2 * cp chunks of c = seq / (2 cp) tokens and CP rank r holds chunks r and 2 cp - 1 - r, so that every rank has
the same causal work (a short-prefix chunk and a long-prefix one). RoPE follows the same layout in megatron-core
(`get_pos_emb_on_this_cp_rank`; MLA's decoupled RoPE as well), so the model needs only (1) the batch cut this way
on each rank (`slice_batch`), and (2) a core attention that sees the whole sequence's keys and values
(`attention`):

    K, V  (s/cp, b, groups, d) local  --all-gather over cp, chunks back in order-->  (s, b, groups, d)
    out[chunk k] = causal attention of the local queries of chunk k against K[:(k + 1) c], V[:(k + 1) c]

Chunk k's queries sit at positions k c .. (k + 1) c - 1, the last c of its keys: a causal mask aligned to the
bottom-right corner (models/blocks.py CoreAttention `_masked`, which also applies a sliding window), so keys of
later chunks are never computed with. The all-gather is megatron-core's differentiable one
(`gather_from_sequence_parallel_region` on the CP group): its backward reduce-scatters the K/V gradients, i.e.
sums every rank's contribution into the rank that owns the chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

SEQUENCE_DIM = 1  # batches are (batch, seq)


def local_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two of 2 * cp sequence chunks CP rank `rank` holds, in the order it holds them."""
    return rank, 2 * cp - 1 - rank


def slice_sequence(x: Tensor, *, cp: int, rank: int, dim: int = SEQUENCE_DIM) -> Tensor:
    """This CP rank's part of `x` along `dim` (megatron-core's `get_batch_on_this_cp_rank`)."""
    if cp == 1:
        return x
    length = x.shape[dim]
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} tokens does not split into 2*cp = {2 * cp} chunks")
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[k] for k in local_chunks(cp, rank)], dim=dim)


def unslice_sequence(x: Tensor, *, cp: int, rank: int, dim: int = SEQUENCE_DIM) -> Tensor:
    """The full-length tensor with this rank's part of the sequence in place and zeros elsewhere (so that a sum
    over the CP group gives the whole sequence)."""
    if cp == 1:
        return x
    c = x.shape[dim] // 2
    shape = list(x.shape)
    shape[dim] = 2 * cp * c
    out = x.new_zeros(shape)
    for i, k in enumerate(local_chunks(cp, rank)):
        out.narrow(dim, k * c, c).copy_(x.narrow(dim, i * c, c))
    return out


def slice_batch(batch: dict[str, Tensor], *, cp: int, rank: int, keys) -> dict[str, Tensor]:
    """A micro-batch with its (batch, seq) tensors `keys` (tokens, labels, loss mask, position ids) cut to this CP
    rank's part; per-sample tensors (e.g. "source", (batch, sources)) are kept whole."""
    return {k: slice_sequence(v, cp=cp, rank=rank) if k in keys else v for k, v in batch.items()}


def in_order(gathered: Tensor, cp: int) -> Tensor:
    """All-gathered (cp * 2c, ...) tensor in rank order [r0: chunk 0, chunk 2cp-1 | r1: chunk 1, chunk 2cp-2 |
    ...] -> (2cp * c, ...) in sequence order."""
    c = gathered.shape[0] // (2 * cp)
    pieces = gathered.view(2 * cp, c, *gathered.shape[1:])  # (rank * 2 + i, c, ...)
    where = [0] * (2 * cp)  # position of chunk k in the gathered tensor
    for r in range(cp):
        for i, k in enumerate(local_chunks(cp, r)):
            where[k] = 2 * r + i
    order = torch.tensor(where, device=gathered.device)
    return pieces.index_select(0, order).reshape(gathered.shape)


def gather_sequence(x: Tensor, group) -> Tensor:
    """(s/cp, ...) local part -> (s, ...) whole sequence in order, on every rank of `group`; differentiable
    (backward: reduce-scatter of the gradient, megatron-core's sequence-parallel gather on the CP group)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    gathered = gather_from_sequence_parallel_region(
        x.contiguous(), tensor_parallel_output_grad=True, group=group
    )
    return in_order(gathered, group.size())


def attention(
    attend: Callable[[Tensor, Tensor, Tensor], Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    cp: int,
    rank: int,
    gather: Callable[[Tensor], Tensor],
    window: int | None = None,
) -> Tensor:
    """Causal attention of this CP rank's queries (its two chunks, (2c, b, heads, dk)) against the whole
    sequence's keys and values. `attend(q, k, v)` is causal attention with the mask aligned bottom-right (queries
    are the last sq of sk positions, masked by relative position, so keys may be cut from the front; models/
    blocks.py CoreAttention); `gather` takes the local (2c, b, groups, d) keys or values to the whole
    (2 cp c, ...) sequence in order; `window`: a sliding window of that many positions (keys further back than
    the chunk's first query can see are not attended at all). -> (2c, b, heads * dv)."""
    key, value = gather(key), gather(value)  # (s, b, groups, d)
    c = query.shape[0] // 2
    out = []
    for i, k in enumerate(local_chunks(cp, rank)):
        end = (k + 1) * c  # chunk k's queries see keys 0 .. end - 1, the last c of them causally
        start = max(0, k * c - window + 1) if window is not None else 0
        out.append(attend(query[i * c : (i + 1) * c], key[start:end], value[start:end]))
    return torch.cat(out, dim=0)


@contextlib.contextmanager
def whole_sequences(model: torch.nn.Module):
    """Run a model built under context parallelism on whole sequences on this rank alone (the passkey probe, the
    report's greedy sample: every rank computes the same thing), restored on exit: RoPE not sliced
    (megatron-core's RotaryEmbedding), no K/V all-gather (models/blocks.py CoreAttention), and the rotary length
    not multiplied by cp (the TransformerConfig)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from models.blocks import CoreAttention

    config = model.config
    saved = [(config, "context_parallel_size", config.context_parallel_size)]
    saved += [
        (m, "cp_group", m.cp_group)
        for m in model.modules()
        if isinstance(m, (RotaryEmbedding, CoreAttention))
    ]
    # RotaryEmbedding.forward is lru_cached by (module, length, ...): the sliced angles of training would be
    # returned for the whole sequence of the same length.
    clear = getattr(RotaryEmbedding.forward, "cache_clear", lambda: None)
    try:
        config.context_parallel_size = 1
        for owner, attr, _ in saved[1:]:
            setattr(owner, attr, None)
        clear()
        yield model
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
        clear()
