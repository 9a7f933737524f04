"""The memory model against bytes measured in our own CPU run: megatron-core's GPTModel (fp32, core attention
unfused ("local", scores saved) or SDPA (flash: no scores saved)), DDP + distributed optimizer after one step;
activations are the tensors autograd saves for the backward."""

from __future__ import annotations

import pytest
import torch

from models.gpt import build_model
from models.registry import sizes
from parallel import engine
from parallel.layout import ParallelLayout
from parallel.plan.memory import Layout, memory_per_gpu


@pytest.mark.slow  # builds megatron-core's model and optimizer (~15-40 s on a loaded 2-core machine)
@pytest.mark.parametrize(("micro_batch", "backend"), [(1, "local"), (2, "local"), (1, "sdpa"), (2, "sdpa")])
def test_memory_model_matches_measured_cpu_bytes(megatron_world1, micro_batch, backend):
    arch, vocab, seq = sizes("llama3")["tiny"], 4096, 256
    layout = ParallelLayout(nproc_per_node=1, micro_batch=micro_batch)
    model = build_model(arch, vocab_size=vocab, max_seq_length=seq, attention_backend=backend)
    ddp = engine.wrap_ddp(model, layout)
    opt = engine.build_optimizer(
        ddp, layout=layout, lr=1e-3, min_lr=0.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0,
        bf16=False,
    )  # fmt: skip
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):  # every storage autograd keeps, once; weights are not activations
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    tokens = torch.randint(0, vocab, (micro_batch, seq))
    pos = torch.arange(seq).expand(micro_batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ddp(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    optim = sum(
        v.numel() * v.element_size()
        for o in getattr(opt, "chained_optimizers", [opt])
        for state in o.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    predicted = memory_per_gpu(
        arch, Layout(micro_batch=micro_batch), vocab_size=vocab, seq_length=seq, num_microbatches=1,
        flash_attention=backend == "sdpa", precision="fp32", kernels="local",
    )  # fmt: skip
    assert (weights, grads, optim) == (predicted.weights, predicted.grads, predicted.optimizer)  # 4 + 4 + 8 B
    measured = sum(saved.values())
    print(f"activations: predicted {predicted.activations:.0f} B, measured {measured} B")
    assert predicted.activations == pytest.approx(measured, rel=0.05)


def test_planner_state_bytes_equal_the_formula_the_parity_runs_measure():
    """tests/parallel/test_parity.py measures each rank's parameter, gradient and optimizer bytes in 2- and
    4-process runs (DP, ZeRO, TP, SP, PP, VPP, DeepSpeed 1-3) against `ParallelLayout.model_state_bytes`
    within 5%; the planner's memory model gives the same bytes for every one of those dense layouts, so it
    is held to the measured per-rank bytes too (MoE: see test_moe_expert_parallel_shards_experts)."""
    from models.registry import resolve_arch
    from tests.parallel import parity_worker as W
    from tests.parallel.test_parity import FOUR, TWO

    arch = resolve_arch("llama3", "tiny", **W.ARCH)
    params = 180_800  # the parity model: 2 x 256 x 64 embedding/output + 4 layers + final norm
    checked = 0
    for nproc, layouts in ((2, TWO), (4, FOUR)):
        for name, spec in layouts.items():
            if spec.get("moe"):
                continue
            spec = spec.get("resume_as", {k: v for k, v in spec.items() if k != "resume_at"})
            run = ParallelLayout(nproc_per_node=nproc, **spec)
            expected = run.model_state_bytes(params, embedding_params=W.VOCAB * W.ARCH["hidden_size"])
            layout = Layout(
                tp=run.tp, pp=run.pp, dp=run.dp_size, vpp=run.vpp, sp=run.sp, micro_batch=W.MICRO,
                engine=run.engine, zero=run.zero_stage, recompute=run.recompute,
            )  # fmt: skip
            got = memory_per_gpu(
                arch, layout, vocab_size=W.VOCAB, seq_length=W.SEQ, num_microbatches=1, precision="fp32",
                kernels="local",
            )  # fmt: skip
            assert (got.weights, got.grads, got.optimizer) == pytest.approx(
                (expected["params"], expected["grads"], expected["optimizer"]), rel=1e-9
            ), name
            checked += 1
    assert checked == 21
