"""Devices and process groups: the torch process group, and megatron-core's groups for every axis of the
layout (tp, cp, ep, etp, dp, pp and virtual stages). Both engines use them (DeepSpeed's data-parallel group
is the world when tp = pp = 1). The engines themselves are in parallel/engines/."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from parallel import cpu
from parallel.fixes import apply_megatron_fixes
from parallel.layout import ParallelLayout

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no GPU; use device=auto or device=cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (env://), or a world of one when run without torchrun."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        # torchrun's store outlives a restart (parallel.max_restarts) and still holds the first attempt's keys,
        # e.g. the dead workers' gloo addresses, which new groups would try to connect to: every attempt
        # keys the store under its own prefix.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"kiln/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        # A world of one on an in-process store: no port to take, and no torchrun variables left in
        # os.environ for child processes to mistake for their own.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def init_model_parallel(layout: ParallelLayout, *, seed: int, device: torch.device) -> None:
    """megatron-core process groups for the layout, and its tensor-parallel RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device.type == "cpu":
        cpu.apply()
    apply_megatron_fixes()
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(
            f"the layout expects {layout.world_size} processes (parallel.nproc_per_node*nnodes) "
            f"but torchrun started {dist.get_world_size()}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
            # Explicit: megatron's default expert-TP = TP cannot divide some worlds (ENGINES-CPU.md).
            expert_tensor_parallel_size=layout.etp,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, layout: ParallelLayout, *, chunk: int = 0):
    """megatron-core DDP: grads in one contiguous fp32 buffer, reduced in buckets as backward proceeds.
    Virtual-pipeline chunks after the first share no bucketing (as in Megatron-LM's training.py), so their
    reduce starts only when the schedule finishes them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=layout.overlap_grad_reduce,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    return DistributedDataParallel(
        config=model.config, ddp_config=ddp_config, module=model, disable_bucketing=chunk > 0
    )


def build_optimizer(
    ddp_model,
    *,
    layout: ParallelLayout,
    lr: float,
    min_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    clip_grad: float,
    bf16: bool,
):
    """AdamW through megatron-core (no decay on norms and biases; distributed optimizer when the layout asks)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: torch AdamW semantics
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=eps,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.float32,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    return get_megatron_optimizer(config, ddp_model if isinstance(ddp_model, list) else [ddp_model])


def configure_schedule_hooks(ddp_model) -> None:
    """What megatron-core's forward_backward_func needs to drive DDP: no_sync for all but the last
    micro-batch, and finalize_model_grads (finish bucketed reduce, TP-shared and embedding grads) after
    backward. `ddp_model` is one DDP module or the list of virtual-pipeline chunks (the schedule reads the
    first chunk's config)."""
    from megatron.core.distributed import finalize_model_grads

    chunks = ddp_model if isinstance(ddp_model, list) else [ddp_model]
    config = chunks[0].config
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
