"""The megatron-core engine: this rank's pipeline stage (one chunk per virtual stage), each chunk in megatron-core
DDP (bucketed gradient reduce overlapped with backward; the distributed optimizer = ZeRO-1 at zero_stage=1),
AdamW through megatron-core's optimizer, and micro-batches driven by `get_forward_backward_func` (no pipeline,
1F1B, or interleaved 1F1B with virtual stages). TP/SP and EP/ETP come from the process groups
(parallel/engine.py) and the model's TransformerConfig; recompute is a TransformerConfig setting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel import engine as groups
from parallel.engines import OptimSettings, optimizer_state_bytes, tensor_bytes, token_loss
from parallel.layout import ParallelLayout
from train.checkpoint import MegatronState
from train.metrics import loss_pairs, reduce_breakdown

log = logging.getLogger(__name__)


def config_overrides(layout: ParallelLayout, *, device: torch.device) -> dict:
    """TransformerConfig fields the engine sets on top of the model's config for this layout (the model code
    already takes tp/sp/pp/vpp/ep/etp)."""
    out: dict = {}
    if device.type == "cpu":
        # Batched p2p on gloo gives wrong numbers under the interleaved schedule (ENGINES-CPU.md, wrong case 1).
        out["batch_p2p_comm"] = False
    if layout.cp > 1:
        out["context_parallel_size"] = layout.cp
    if layout.recompute == "selective":
        # Recompute core attention only: the activations that grow with seq^2 (Korthikanti et al. 2022, sec. 5).
        out["recompute_granularity"] = "selective"
    elif layout.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out


def stage_kwargs(layout: ParallelLayout, *, vp_stage: int | None, device: torch.device) -> dict:
    """What the model factory (models.gpt.build_model) needs to build this rank's part of the model."""
    return {
        "pp": layout.pp,
        "vpp": layout.vpp if layout.vpp > 1 else None,
        "vp_stage": vp_stage,
        "ep": layout.ep,
        "etp": layout.etp,
        "config_overrides": config_overrides(layout, device=device),
    }


def build_chunks(
    layout: ParallelLayout, build_model: Callable[..., torch.nn.Module], *, device: torch.device
) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual stage (one when vpp = 1)."""
    chunks = []
    for vp in range(layout.vpp):
        stage = stage_kwargs(layout, vp_stage=vp if layout.vpp > 1 else None, device=device)
        chunk = build_model(**stage)
        if chunk.config.pipeline_model_parallel_size != layout.pp:
            raise RuntimeError(
                f"the model factory built a model for pp={chunk.config.pipeline_model_parallel_size}, the layout "
                f"has pp={layout.pp}: it must pass the engine's keyword arguments on to models.gpt.build_model"
            )
        chunks.append(chunk.to(device))
    return chunks


def _forward_step(data_iterator, model):
    """megatron-core forward step: per-token losses summed over the loss mask; the schedule divides by the
    token count (and the number of micro-batches), and the reported [sum, count] pair gives an exact token
    mean. On a pipeline stage other than the first the tokens are ignored (the input is the previous stage's
    activations); the loss function runs on the last stage only. Under context parallelism each rank holds
    part of every sequence (parallel/context.py): as in Megatron-LM's pretrain_gpt `loss_func`, the token count
    is summed over the CP group and the loss multiplied by cp, since DDP averages gradients over dp x cp."""
    from megatron.core import parallel_state as ps

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # (batch, seq)
    cp = ps.get_context_parallel_world_size()

    def loss_func(losses: torch.Tensor):
        loss, count = token_loss(losses, batch["loss_mask"])
        count = count.to(torch.int)
        report = {"lm loss": torch.stack([loss.detach().clone(), count.float()])}  # this rank's tokens
        if cp == 1:  # + the loss per source and position bucket (train/metrics.py)
            return loss, count, report | loss_pairs(losses, batch)
        from parallel import context

        # The per-position breakdown needs positions: this rank's tokens in place in the whole sequence, zeros
        # elsewhere (summed over the CP group by reduce_breakdown).
        rank = ps.get_context_parallel_rank()
        whole = {k: v for k, v in batch.items() if k == "source"}
        whole["loss_mask"] = context.unslice_sequence(batch["loss_mask"], cp=cp, rank=rank)
        pairs = loss_pairs(context.unslice_sequence(losses, cp=cp, rank=rank), whole)
        total = count.clone()
        dist.all_reduce(total, group=ps.get_context_parallel_group())
        return loss * cp, total, report | pairs

    return output, loss_func


class MegatronEngine:
    name = "megatron"

    def __init__(
        self,
        layout: ParallelLayout,
        *,
        build_model: Callable[..., torch.nn.Module],
        optim: OptimSettings,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.layout, self.device = layout, device
        self.modules = build_chunks(layout, build_model, device=device)
        wrapped = self.modules
        if dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            wrapped = [Float16Module(m.config, m) for m in self.modules]
        self.ddp = [groups.wrap_ddp(m, layout, chunk=i) for i, m in enumerate(wrapped)]
        groups.configure_schedule_hooks(self.ddp)
        self.optimizer = groups.build_optimizer(
            self.ddp,
            layout=layout,
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            betas=optim.betas,
            eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=dtype == torch.bfloat16,
        )
        self._state = MegatronState(self.modules, self.optimizer)
        self.loss_breakdown: dict[str, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def train(self) -> None:
        for m in self.ddp:
            m.train()

    def eval(self) -> None:
        for m in self.ddp:
            m.eval()

    def zero_grad(self) -> None:
        for m in self.ddp:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(self, micro: list[dict], *, seq_length: int, forward_only: bool = False) -> float:
        """Run the micro-batches of one step through the schedule; the token-mean loss over the global batch.
        `loss_breakdown` keeps the loss per source and position bucket as [sum, count] (train/metrics.py)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro]
        if self.layout.cp > 1:  # this rank's 2 of 2*cp chunks of every sequence (parallel/context.py)
            from data.blend import SEQUENCE_KEYS
            from parallel import context

            rank = ps.get_context_parallel_rank()
            micro = [
                context.slice_batch(mb, cp=self.layout.cp, rank=rank, keys=SEQUENCE_KEYS) for mb in micro
            ]
        # Every chunk reads the micro-batches in order (the interleaved schedule takes one iterator per chunk).
        data = [iter(micro) for _ in self.ddp] if len(self.ddp) > 1 else iter(micro)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=data,
            model=self.ddp,
            num_microbatches=len(micro),
            seq_length=seq_length,
            micro_batch_size=micro[0]["tokens"].shape[
                0
            ],  # a sequence-length ramp cuts samples into more rows
            forward_only=forward_only,
        )
        if self.layout.pp == 1:  # else rank 0 holds no losses
            group = ps.get_data_parallel_group(with_context_parallel=True)
            self.loss_breakdown = reduce_breakdown(losses, group=group)
        return self._global_mean([entry["lm loss"] for entry in losses])

    def _global_mean(self, pairs: list[torch.Tensor]) -> float:
        """Token-mean loss from [sum, count] pairs: summed over micro-batches, the data-parallel (and context-
        parallel) ranks, and handed from the last pipeline stage (the only one with losses) to the others."""
        from megatron.core import parallel_state as ps

        total = torch.stack(pairs).sum(dim=0) if pairs else torch.zeros(2, device=self.device)
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if self.layout.pp > 1:
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        return (total[0] / total[1]).item()

    def step(self, accept: Callable[[float | None], bool] | None = None) -> float | None:
        """One optimizer step (clips first) unless `accept(grad norm)` says no (train/stability.py): then
        nothing changes, weights nor Adam moments. The gradient norm before clipping. megatron-core's
        ChainedOptimizer.step, split at the norm."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        if opt.prepare_grads():  # inf/nan under fp16 loss scaling (not used here): megatron-core skips
            return None
        grad_norm = float(opt.get_grad_norm())
        if accept is not None and not accept(grad_norm):
            return grad_norm
        for o in getattr(opt, "chained_optimizers", [opt]):
            params = [] if getattr(o, "is_stub_optimizer", False) else o.get_parameters()
            if o.config.clip_grad > 0.0 and params:
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=o.config.clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        opt.step_with_ready_grads()
        return grad_norm

    def state_bytes(self) -> dict[str, int]:
        """This rank's parameters, gradient buffers (fp32, full size: ZeRO-1 shards only the optimizer) and
        optimizer state (sharded over dp by the distributed optimizer; allocated at the first step)."""
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return {
            "params": tensor_bytes(p for m in self.modules for p in m.parameters()),
            "grads": tensor_bytes(
                b.grad_data for d in self.ddp for b in d.buffers + d.expert_parallel_buffers
            ),
            "optimizer": sum(optimizer_state_bytes(o.optimizer) for o in optimizers),
        }

    def save_state(self, path: str, common: dict, *, async_save: bool = False):
        return self._state.save_state(path, common, async_save=async_save)

    def load_state(self, path: str, *, optimizer: bool) -> dict:
        return self._state.load_state(path, optimizer=optimizer)
