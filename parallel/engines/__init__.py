"""Training engines behind one interface, so the loop (train/loop.py) never branches on the engine.

An engine owns the model (its chunks, wrappers and optimizer) and offers:
  forward_backward(micro_batches, seq_length=, forward_only=) -> token-mean loss over the global batch
  zero_grad(); step(accept=None) -> grad norm (before clipping) or None; train(); eval()
                                      accept(grad norm or None) -> False: no update (train/stability.py)
  param_groups                        what the LR schedule (train/schedule.py) sets lr and weight decay on
  save_state(path, common); load_state(path, optimizer=) -> common     (train/checkpoint.py)
  modules                             the bare model chunks (for inspection and tests)
  state_bytes() -> {"params", "grads", "optimizer"}   this rank's bytes of each (None where not measured)

`build_engine` picks the adapter from `layout.engine`:
  megatron   megatron-core DDP (+ distributed optimizer), TP/SP, PP 1F1B and interleaved, EP/ETP, recompute
  deepspeed  DeepSpeed ZeRO 1/2/3 with optional CPU offload, gradient accumulation, bf16 on GPU
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.layout import ParallelLayout


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with decoupled weight decay (none on norms and biases) and global-norm gradient clipping."""

    lr: float
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    clip_grad: float


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a torch optimizer's per-parameter state tensors (Adam: exp_avg, exp_avg_sq; not the scalar step)."""
    return tensor_bytes(
        t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0
    )


def token_loss(losses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token losses (batch, seq) over the loss mask, and the number of tokens counted."""
    return (losses.float() * mask).sum(), mask.sum()


def out_of_memory_message(
    *,
    stage: str,
    layout: ParallelLayout,
    arch,
    vocab_size: int,
    seq_length: int,
    micro_batches: int,
    device: torch.device,
) -> str:
    """What an out-of-memory error during training says: the stage, the rank, the memory measured and the
    planner's estimate for this layout (parallel/plan/memory.py) side by side, and what would lower it."""
    import torch.distributed as dist

    from parallel.plan.memory import Layout, memory_per_gpu

    plan = memory_per_gpu(
        arch,
        Layout(
            tp=layout.tp,
            pp=layout.pp,
            dp=layout.dp_size,
            ep=layout.ep,
            cp=layout.cp,
            vpp=layout.vpp,
            sp=layout.sp,
            micro_batch=layout.micro_batch,
            engine=layout.engine,
            zero=layout.zero_stage,
            recompute=layout.recompute,
        ),
        vocab_size=vocab_size,
        seq_length=seq_length,
        num_microbatches=micro_batches,
        precision="bf16" if device.type == "cuda" else "fp32",
        kernels="fused" if device.type == "cuda" else "local",
    )
    if device.type == "cuda":
        measured = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated by torch"
        capacity = f" of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
    else:
        import psutil

        measured, capacity = f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB resident", ""
    rank = dist.get_rank() if dist.is_initialized() else 0
    gib = 2**30
    return (
        f"out of memory in stage {stage!r} on rank {rank} ({device}): measured {measured}{capacity}; "
        f"the planner estimated {plan.total / gib:.2f} GiB per GPU (weights {plan.weights / gib:.2f}, grads "
        f"{plan.grads / gib:.2f}, optimizer {plan.optimizer / gib:.2f}, activations {plan.activations / gib:.2f}, "
        f"margin {plan.margin / gib:.2f}) for tp={layout.tp} pp={layout.pp} dp={layout.dp_size} "
        f"micro_batch={layout.micro_batch} zero_stage={layout.zero_stage} recompute={layout.recompute}. "
        "Lower parallel.micro_batch, set parallel.recompute=selective or full, raise tp/pp, or use a higher "
        "ZeRO stage (python -m parallel.plan searches layouts that fit)."
    )


def build_engine(
    layout: ParallelLayout,
    *,
    build_model: Callable[..., torch.nn.Module],
    optim: OptimSettings,
    device: torch.device,
    dtype: torch.dtype,
    grad_accum: int,
):
    """The engine of `layout.engine`. `build_model(**kwargs)` builds the model for the layout's tp/sp and passes
    the engine's keyword arguments (pp, vpp, vp_stage, ep, etp, config_overrides) on to `models.gpt.build_model`,
    once per pipeline chunk of this rank. `grad_accum` is the number of micro-batches per optimizer step on each
    data-parallel rank."""
    if layout.engine == "megatron":
        from parallel.engines.megatron import MegatronEngine

        return MegatronEngine(layout, build_model=build_model, optim=optim, device=device, dtype=dtype)
    from parallel.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(
        layout, build_model=build_model, optim=optim, device=device, dtype=dtype, grad_accum=grad_accum
    )
