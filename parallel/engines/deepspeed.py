"""The DeepSpeed engine: `deepspeed.initialize` from the layout. ZeRO stage 0-3 over the data-parallel axis,
megatron-core's tensor-parallel groups handed in as DeepSpeed's `mpu` (the validator refuses sp, pp, ep, cp with
this engine), optimizer and parameter CPU offload, gradient accumulation, bf16 on GPU only. The model is the same
megatron-core GPTModel the megatron engine trains, and the optimizer the same AdamW with no decay on norms and
biases.

CPU facts (shared/reference/ENGINES-CPU.md): DS_ACCELERATOR=cpu before the import; the shm comm op's 1-2 minute
JIT build at init is skipped; `gradient_clipping` is always set explicitly (DeepSpeed's default 1.0 would
clip silently); torch AdamW instead of DeepSpeedCPUAdam (whose JIT build takes ~5 minutes) also under offload.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel.engines import OptimSettings, optimizer_state_bytes, tensor_bytes, token_loss
from parallel.layout import ParallelLayout
from train.metrics import loss_pairs, reduce_breakdown

log = logging.getLogger(__name__)
TAG = "deepspeed"


def import_deepspeed(device: torch.device):
    """Import deepspeed for `device`; on CPU, with the CPU accelerator and without the shm comm op."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (loads the module patched below)

    if device.type == "cpu":
        # `import deepspeed.comm.torch as m` binds torch itself (deepspeed.comm re-exports it): go through
        # sys.modules. The shm op only speeds up intra-node collectives; gloo does without it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def ds_config(
    layout: ParallelLayout, *, optim: OptimSettings, grad_accum: int, bf16: bool, device: torch.device
) -> dict:
    """The DeepSpeed config of a layout (https://www.deepspeed.ai/docs/config-json/)."""
    zero: dict = {"stage": layout.zero_stage}
    if layout.offload in ("optimizer", "optimizer+param"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if layout.offload == "optimizer+param":
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": layout.micro_batch * grad_accum * layout.dp_size,
        "gradient_clipping": optim.clip_grad,  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW also when offloading (no cpu_adam build)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron-core's default groups: no weight decay on 1-D parameters (norms) and biases. `wd_mult` is what
    the LR schedule (megatron-core's OptimizerParamScheduler) multiplies its weight decay by."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


class MegatronMpu:
    """megatron-core's process groups in the shape DeepSpeed's `mpu` takes: model parallel = tensor parallel
    (DeepSpeed reduces gradients over the data-parallel group and counts a replicated parameter's norm once)."""

    def __getattr__(self, name: str):
        from megatron.core import parallel_state as ps

        table = {
            "get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
            "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
            "get_model_parallel_group": ps.get_tensor_model_parallel_group,
            "get_tensor_model_parallel_rank": ps.get_tensor_model_parallel_rank,
            "get_tensor_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
            "get_tensor_model_parallel_group": ps.get_tensor_model_parallel_group,
            "get_tensor_model_parallel_src_rank": ps.get_tensor_model_parallel_src_rank,
            "get_data_parallel_rank": ps.get_data_parallel_rank,
            "get_data_parallel_world_size": ps.get_data_parallel_world_size,
            "get_data_parallel_group": ps.get_data_parallel_group,
        }
        if name not in table:
            raise AttributeError(name)
        return table[name]


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(
        self,
        layout: ParallelLayout,
        *,
        build_model: Callable[..., torch.nn.Module],
        optim: OptimSettings,
        device: torch.device,
        dtype: torch.dtype,
        grad_accum: int,
    ) -> None:
        deepspeed = import_deepspeed(device)
        self.layout, self.device, self.grad_accum = layout, device, grad_accum
        from parallel.engines.megatron import config_overrides

        model = build_model(config_overrides=config_overrides(layout, device=device)).to(device)
        adamw = torch.optim.AdamW(
            param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
        )
        config = ds_config(
            layout, optim=optim, grad_accum=grad_accum, bf16=dtype == torch.bfloat16, device=device
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=adamw,
            config=config,
            dist_init_required=False,
            mpu=MegatronMpu() if layout.tp > 1 else None,
        )
        self.modules = [self.engine.module]
        self.loss_breakdown: dict[str, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def zero_grad(self) -> None:
        """DeepSpeed clears the gradients itself after each optimizer step."""

    def forward_backward(self, micro: list[dict], *, seq_length: int, forward_only: bool = False) -> float:
        """Each micro-batch: forward, backward of its token-mean loss (DeepSpeed divides by the accumulation
        steps and averages over data-parallel ranks, as megatron-core does), and DeepSpeed's micro-step
        bookkeeping; the optimizer update itself is `step()` after the last micro-batch."""
        if not forward_only and len(micro) != self.grad_accum:
            raise ValueError(f"{len(micro)} micro-batches, but DeepSpeed was set up for {self.grad_accum}")
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        pairs = []  # per source / position bucket (train/metrics.py)
        for i, mb in enumerate(micro):
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            with torch.set_grad_enabled(not forward_only):
                losses = self.engine(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
                loss, count = token_loss(losses, mb["loss_mask"])
            total += torch.stack([loss.detach().double(), count.double()])
            pairs.append(loss_pairs(losses, mb))
            if not forward_only:
                self.engine.backward(loss / count)
                if i < len(micro) - 1:
                    self.engine.step()  # not a boundary: counts the micro-step, updates nothing
        from megatron.core import parallel_state as ps

        dist.all_reduce(total, group=ps.get_data_parallel_group())
        self.loss_breakdown = reduce_breakdown(pairs)
        return (total[0] / total[1]).item()

    def step(self, accept: Callable[[float | None], bool] | None = None) -> float | None:
        """The optimizer update at the gradient-accumulation boundary; the gradient norm before clipping.
        DeepSpeed knows the norm only inside its step, so `accept(None)` (train/stability.py) decides before it
        on the loss: when it says no, DeepSpeed's step runs its bookkeeping (micro/global step counts, zeroed
        gradients) around a no-op of the torch AdamW it wraps, so no weight or Adam moment changes. A
        non-finite gradient norm found inside the step (finite loss): ZeRO 1/2 skip that update themselves;
        the loop records it as a bad step either way."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed step() off the accumulation boundary: forward_backward was not run")
        torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        skip = accept is not None and not accept(None)
        if skip:
            torch_optimizer.step = lambda *args, **kwargs: None  # shadows the class's step for this call
        try:
            self.engine.step()
        finally:
            if skip:
                del torch_optimizer.step
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def state_bytes(self) -> dict[str, int | None]:
        """This rank's parameters (ZeRO-3: its partition) and optimizer state (ZeRO >= 1: its partition; the
        Adam moments of the torch optimizer DeepSpeed wraps). Gradients live in stage-specific buffers: not
        measured."""
        params = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        return {
            "params": tensor_bytes(params),
            "grads": None,
            "optimizer": optimizer_state_bytes(torch_optimizer),
        }

    def save_state(self, path: str, common: dict) -> None:
        self.engine.save_checkpoint(path, tag=TAG, client_state={"kiln": common}, save_latest=False)

    def load_state(self, path: str, *, optimizer: bool) -> dict:
        if not os.path.isdir(os.path.join(path, TAG)):
            raise RuntimeError(
                f"{path} holds no DeepSpeed checkpoint (saved by another engine?); "
                "Kiln does not convert checkpoints between engines"
            )
        _, client = self.engine.load_checkpoint(
            path,
            tag=TAG,
            load_optimizer_states=optimizer,
            load_lr_scheduler_states=False,
            load_module_only=not optimizer,
        )
        return client["kiln"]
