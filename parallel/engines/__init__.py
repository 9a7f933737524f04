"""Training engines behind one interface, so the loop (train/loop.py) never branches on the engine.

An engine owns the model (its chunks, wrappers and optimizer) and offers:
  forward_backward(micro_batches, seq_length=, forward_only=) -> token-mean loss over the global batch
  zero_grad(); step() -> grad norm (before clipping) or None; train(); eval()
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


def build_engine(
    layout: ParallelLayout,
    *,
    build_model: Callable[[], torch.nn.Module],
    optim: OptimSettings,
    device: torch.device,
    dtype: torch.dtype,
    grad_accum: int,
):
    """The engine of `layout.engine`. `build_model()` returns the whole single-device model (a megatron-core
    GPTModel built for the layout's tp/sp); engines cut it into pipeline stages themselves. `grad_accum` is the
    number of micro-batches per optimizer step on each data-parallel rank."""
    if layout.engine == "megatron":
        from parallel.engines.megatron import MegatronEngine

        return MegatronEngine(layout, build_model=build_model, optim=optim, device=device, dtype=dtype)
    from parallel.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(
        layout, build_model=build_model, optim=optim, device=device, dtype=dtype, grad_accum=grad_accum
    )
