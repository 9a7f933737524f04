"""Context parallelism's chunk and mask math on one process (parallel/context.py): the batch is cut as
megatron-core cuts it, and every simulated CP rank's queries against the gathered keys/values give exactly its
part of full causal attention (and the same gradients), for GQA, sliding windows, soft-capping, SDPA and the
unfused path. The collectives themselves are checked by the multi-process parity matrix
(tests/parallel/test_parity.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.blocks import CoreAttention
from parallel import context


class _Group:  # what megatron-core's get_batch_on_this_cp_rank reads of a process group
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_batch_is_cut_as_megatron_cuts_it(cp, megatron_world1):  # megatron reads the group once dist is up
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = 16
    batch = {
        "tokens": torch.arange(2 * seq).view(2, seq),
        "labels": torch.arange(2 * seq).view(2, seq) + 1000,
        "loss_mask": torch.rand(2, seq),
        "position_ids": torch.arange(seq).expand(2, -1).contiguous(),
    }
    keys = tuple(batch)
    parts = []
    for rank in range(cp):
        ours = context.slice_batch(batch | {"source": torch.eye(2)}, cp=cp, rank=rank, keys=keys)
        theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=_Group(cp, rank))
        for k in keys:
            assert torch.equal(ours[k], theirs[k]), (cp, rank, k)
        assert torch.equal(ours["source"], torch.eye(2))  # per-sample tensors stay whole
        parts.append(ours["position_ids"])
    # unslice puts each part back in place: summed over ranks it is the whole sequence
    whole = sum(context.unslice_sequence(p, cp=cp, rank=r) for r, p in enumerate(parts))
    assert torch.equal(whole, batch["position_ids"])
    # what an all-gather of the parts returns (rank order), put back in sequence order
    gathered = torch.cat([p.T for p in parts], dim=0)  # (seq, batch): the sequence dim first, as in attention
    assert torch.equal(context.in_order(gathered, cp), batch["position_ids"].T)


def test_the_chunks_balance_causal_work():
    """Rank r holds chunks r and 2cp-1-r: every rank's queries see the same number of keys."""
    for cp in (2, 4, 8):
        work = {sum(k + 1 for k in context.local_chunks(cp, r)) for r in range(cp)}
        assert work == {2 * cp + 1}


def _qkv(seq, *, heads=4, groups=2, dk=8, dv=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, dk, generator=g, dtype=torch.float64)
    k = torch.randn(seq, batch, groups, dk, generator=g, dtype=torch.float64)
    v = torch.randn(seq, batch, groups, dv, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)]


CASES = {
    "gqa, sdpa": dict(groups=2),
    "mqa, unfused": dict(groups=1, sdpa=False),
    "mha, sliding window 5": dict(groups=4, window=5),
    "gqa, window 7, soft-capping 2.0": dict(groups=2, window=7, softcap=2.0),
}


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_local_queries_against_gathered_kv_equal_full_attention(cp, case):
    opts = dict(CASES[case])
    groups = opts.pop("groups")
    seq = 8 * cp  # chunks of 4 tokens
    core = CoreAttention(config=SimpleNamespace(kv_channels=8), layer_number=1, **opts)
    q, k, v = _qkv(seq, groups=groups)
    full = core(q, k, v)  # (seq, batch, heads * dv), one process
    full_grad = torch.autograd.grad(full.pow(2).sum(), (q, k, v))

    total = 0.0
    for rank in range(cp):
        mine = [context.slice_sequence(t, cp=cp, rank=rank, dim=0) for t in (q, k, v)]

        # The all-gather: every rank's part of the same tensor, in rank order, then in sequence order.
        def gather(t, mine=mine):
            src = k if t is mine[1] else v
            assert t is mine[1] or t is mine[2]
            parts = [context.slice_sequence(src, cp=cp, rank=r, dim=0) for r in range(cp)]
            return context.in_order(torch.cat(parts, dim=0), cp)

        out = context.attention(core._attend, *mine, cp=cp, rank=rank, gather=gather, window=core.window)
        ref = context.slice_sequence(full, cp=cp, rank=rank, dim=0)
        assert (out - ref).abs().max().item() < 1e-6, (case, cp, rank)
        total = total + out.pow(2).sum()
    grads = torch.autograd.grad(total, (q, k, v))  # every rank's share, summed: the CP backward's reduce
    for name, got, want in zip("qkv", grads, full_grad, strict=True):
        # relative to the largest gradient (the unfused path's softmax runs in float32, as on a GPU)
        assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item(), (case, cp, name)


def test_local_backend_under_cp_uses_the_gathering_core_attention():
    """megatron-core's DotProductAttention asserts cp == 1: with cp > 1 the `local` backend takes CoreAttention's
    unfused path (the same math), which gathers K/V."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from models.registry import resolve_arch
    from models.spec import _core_attention

    arch = resolve_arch("llama3", "tiny")
    assert _core_attention(arch, 0, "local") is DotProductAttention
    core = _core_attention(arch, 0, "local", cp=2)
    assert core.func is CoreAttention and core.keywords["sdpa"] is False
