"""Run under torchrun (2 gloo processes): the fused kernels at TP=2 (and TP=2+SP) against the plain path at the same
layout and weights - loss and every local gradient - and the vocab-parallel fused cross-entropy against
`F.cross_entropy` on the gathered logits. Writes {case: worst relative diffs} as JSON to argv[1] (rank 0)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.fusions import Fusions, fused_cross_entropy
from models.gpt import build_model
from tests.models.dist_parity import finish_worker, gather_logits, init, sp_grad_reduce, start_worker
from tests.models.hf_helpers import SEQ, VOCAB, arch_of

FUSED = Fusions(norm=True, activation=True, cross_entropy=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def loss_and_grads(model, tokens, labels):
    pos = torch.arange(SEQ).expand_as(tokens)
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    sp_grad_reduce(model)
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def run_case(case: str, sp: bool) -> dict[str, float]:
    _, arch = arch_of(case)
    init(tp=2)
    torch.manual_seed(7)  # the same tokens on both ranks
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.roll(tokens, -1, dims=1)
    plain = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ, tp=2, sp=sp)
    fused = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ, tp=2, sp=sp, fusions=FUSED)
    fused.load_state_dict(plain.state_dict())  # this rank's shards
    ref_loss, ref_grads = loss_and_grads(plain, tokens, labels)
    loss, grads = loss_and_grads(fused, tokens, labels)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    out = {
        "loss": rel(loss, ref_loss),
        "grads": max(rel(grads[n], g) for n, g in ref_grads.items()),
        "fused_ran": float(fused.config.bias_activation_fusion and fused.fused_cross_entropy),
    }
    worst = torch.tensor([out["loss"], out["grads"]])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the worse rank
    out["loss"], out["grads"] = worst.tolist()
    return out


def vocab_parallel_cross_entropy_case() -> dict[str, float]:
    """Each rank holds half the vocabulary; the loss and the logits' gradient equal F.cross_entropy's on the
    whole logits."""
    from megatron.core import parallel_state

    init(tp=2)
    torch.manual_seed(11)
    full = torch.randn(SEQ, 2, VOCAB) * 3  # (seq, batch, vocab), the same on both ranks
    target = torch.randint(0, VOCAB, (SEQ, 2))
    weight = torch.rand(SEQ, 2)  # a loss mask-like weighting: non-uniform upstream gradients
    rank, half = parallel_state.get_tensor_model_parallel_rank(), VOCAB // 2
    shard = full[..., rank * half : (rank + 1) * half].clone().requires_grad_()
    loss = fused_cross_entropy(shard.clone(), target, parallel_state.get_tensor_model_parallel_group())
    (loss * weight).sum().backward()
    ref = full.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref.reshape(-1, VOCAB), target.reshape(-1), reduction="none").reshape(SEQ, 2)
    (ref_loss * weight).sum().backward()
    grad = gather_logits(shard.grad)  # (seq, batch, vocab)
    return {"loss": rel(loss.detach(), ref_loss.detach()), "grads": rel(grad, ref.grad), "fused_ran": 1.0}


def main() -> None:
    start_worker(900)
    results = {"cross_entropy:tp2": vocab_parallel_cross_entropy_case()}
    for case in ("llama3", "gemma2", "mixtral"):
        for sp in (False, True) if case != "mixtral" else (True,):  # megatron's MoE at TP>1 needs SP
            results[f"{case}:tp2{',sp' if sp else ''}"] = run_case(case, sp)
            dist.barrier()
    finish_worker(results)


if __name__ == "__main__":
    main()
