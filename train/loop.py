"""One stage of training: build the model for the stage's context and RoPE, start it from random init,
an earlier stage, or its own latest checkpoint, and train for the stage's tokens on its data mix."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from data import blend
from data.prepare import PreparedData
from models.llama import build_model, padded_vocab_size
from parallel import engine
from train import checkpoint, metrics
from train.config import StageConfig, TrainConfig
from train.logs import MetricSinks, Progress, set_stage, set_step
from train.schedule import build_scheduler

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    step: int
    tokens: int
    final: bool
    peak_lr: float
    lr: float
    """LR of the last update (where a following stage with lr=null starts)."""
    train_loss: list[float] = field(default_factory=list)
    """[first, last] logged training loss of the stage."""
    valid_start: dict[str, float] = field(default_factory=dict)
    valid_end: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    checkpoint: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass
class Run:
    cfg: TrainConfig
    device: torch.device
    prepared: PreparedData
    vocab_size: int
    sinks: MetricSinks


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_step(data_iterator, model, *, num_sources: int = 0):
    """megatron-core forward step: per-token losses summed over the loss mask; the schedule divides by
    the token count (and micro-batches), and the reported [sum, count] pair gives an exact token mean.
    Also [sum, count] pairs per position bucket and, with the samples' blend sources in the batch, per source."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"]
    )  # (batch, seq) losses
    mask = batch["loss_mask"]

    def loss_func(losses: torch.Tensor):
        per_token = losses.float() * mask
        loss = per_token.sum()
        count = mask.sum().to(torch.int)
        report = {"lm loss": torch.stack([loss.detach().clone(), count.float()])}
        report.update(metrics.loss_pairs(per_token.detach(), mask, batch.get("source"), num_sources))
        return loss, count, report

    return output, loss_func


def _dp_mean(pairs: list[torch.Tensor]) -> float:
    """Token-mean loss over this rank's micro-batches and its data-parallel peers, from [sum, count] pairs."""
    from megatron.core import parallel_state

    total = torch.stack(pairs).sum(dim=0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


def _fwd_bwd(
    run: Run, ddp, micro: list[dict], *, seq_length: int, forward_only: bool, sources: list[str] | None = None
):
    """(token-mean loss of the batch, more metrics): `loss/<source>` with `sources` and the samples'
    sources in the batch; `by_position` (loss per position bucket) when `forward_only`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, num_sources=len(sources or ())),
        data_iterator=iter([_to(mb, run.device) for mb in micro]),
        model=[ddp],
        num_microbatches=len(micro),
        seq_length=seq_length,
        micro_batch_size=run.cfg.parallel.micro_batch,
        forward_only=forward_only,
    )
    loss = _dp_mean([entry["lm loss"] for entry in losses])
    extra = {}
    if sources and micro and "source" in micro[0]:
        extra = metrics.source_losses([entry["source loss"] for entry in losses], sources)
    if forward_only:
        extra["by_position"] = metrics.position_losses([entry["position loss"] for entry in losses])
    return loss, extra


def _valid_record(losses: dict[str, float], positions: dict | None = None) -> dict:
    return {f"valid/{k}": v for k, v in losses.items()} | {
        f"valid_by_position/{k}": v for k, v in (positions or {}).items()
    }


def evaluate(
    run: Run, ddp, datasets: dict, stage: StageConfig, positions: dict | None = None
) -> dict[str, float]:
    """Held-out loss per source, over `stage.eval_tokens` tokens (split over data-parallel ranks); loss per
    position bucket per source into `positions` when given."""
    from megatron.core import parallel_state

    layout = run.cfg.parallel
    per_step = layout.dp_size * layout.micro_batch
    samples = max(per_step, stage.eval_tokens // stage.seq_length // per_step * per_step)
    out = {}
    ddp.eval()
    with torch.no_grad():
        for name, ds in datasets.items():
            idx = blend.step_indices(
                0,
                batch_sequences=samples,
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=layout.dp_size,
            )
            micro = blend.micro_batches(ds, idx, micro_batch=layout.micro_batch)
            out[name], extra = _fwd_bwd(run, ddp, micro, seq_length=stage.seq_length, forward_only=True)
            if positions is not None:
                positions[name] = extra["by_position"]
    ddp.train()
    return out


def _current_lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def run_stage(run: Run, name: str, stage: StageConfig, *, init_path: str | None) -> StageResult:
    from megatron.core import parallel_state

    cfg, layout = run.cfg, run.cfg.parallel
    set_stage(name)
    directory = checkpoint.stage_dir(cfg.run_dir, name)
    resume = checkpoint.latest(directory)
    if resume is not None and checkpoint.read_state(resume)["final"]:
        log.info("stage %s is complete (%s); skipping", name, resume)
        return StageResult(**checkpoint.read_state(resume))

    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    model = build_model(
        cfg.model.arch(),
        vocab_size=run.vocab_size,
        max_seq_length=stage.seq_length,
        tp=layout.tp,
        sp=layout.sp,
        rope_scaling_factor=stage.rope_scaling_factor,
        dtype=dtype,
    ).to(run.device)
    if dtype != torch.float32:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    ddp = engine.wrap_ddp(model, layout)
    engine.configure_schedule_hooks(ddp)
    order = list(cfg.recipe.stages)
    sources = sorted(stage.mix)
    meter = metrics.StageMetrics(
        logging_cfg=cfg.logging,
        stage=stage,
        arch=cfg.model.arch(),
        padded_vocab=padded_vocab_size(run.vocab_size, layout.tp),
        device=run.device,
        sources=sources,
        later_tokens=0
        if cfg.only_stage
        else sum(cfg.recipe.stages[s].tokens for s in order[order.index(name) + 1 :]),
        peak_flops=metrics.peak_flops_per_device(cfg.logging, gpu=cfg.cluster.gpu),
    )
    meter.attach(ddp)

    peak_lr = stage.lr
    if resume is not None:
        peak_lr = checkpoint.read_state(resume)["peak_lr"]
    elif init_path is not None and peak_lr is None:
        peak_lr = checkpoint.read_state(init_path)["lr"]
    optimizer = engine.build_optimizer(
        ddp,
        layout=layout,
        lr=peak_lr,
        min_lr=stage.min_lr,
        weight_decay=stage.weight_decay,
        betas=(stage.adam_beta1, stage.adam_beta2),
        eps=stage.adam_eps,
        clip_grad=stage.clip_grad,
        bf16=dtype == torch.bfloat16,
    )
    scheduler = build_scheduler(
        optimizer,
        peak_lr=peak_lr,
        min_lr=stage.min_lr,
        tokens=stage.tokens,
        warmup_tokens=stage.warmup_tokens,
        schedule=stage.schedule,
        decay_tokens=stage.decay_tokens,
        decay_style=stage.decay_style,
        weight_decay=stage.weight_decay,
    )

    result = StageResult(stage=name, step=0, tokens=0, final=False, peak_lr=peak_lr, lr=peak_lr)
    if resume is not None:
        result = StageResult(
            **checkpoint.load(
                resume,
                model=ddp.module,
                optimizer=optimizer,
                scheduler=scheduler,
                full_verify=cfg.checkpoint.full_verify,
            )
        )
        log.info("resumed %s at step %d (%d tokens) from %s", name, result.step, result.tokens, resume)
    elif init_path is not None:
        # Keep the previous stage's Adam moments when asked, never its schedule: its param groups carry
        # their own max_lr/min_lr, which megatron-core's scheduler would go on using.
        schedule = [{k: g[k] for k in ("lr", "max_lr", "min_lr") if k in g} for g in optimizer.param_groups]
        checkpoint.load(init_path, model=ddp.module, optimizer=optimizer if stage.keep_optimizer else None)
        for group, own in zip(optimizer.param_groups, schedule, strict=True):
            group.update(own)
        log.info("initialized %s from %s (peak LR %.3g)", name, init_path, peak_lr)

    steps = stage.steps
    train_ds = blend.train_dataset(
        run.prepared,
        mix=stage.mix,
        seq_length=stage.seq_length,
        samples=steps * stage.batch_sequences,
        seed=cfg.data.seed,
        valid_percent=cfg.data.valid_percent,
    )
    per_step = layout.dp_size * layout.micro_batch
    valid_ds = blend.valid_datasets(
        run.prepared,
        sources=sorted(cfg.data.sources),
        seq_length=stage.seq_length,
        samples=max(per_step, stage.eval_tokens // stage.seq_length),
        seed=cfg.data.seed,
        valid_percent=cfg.data.valid_percent,
    )
    run.sinks.begin_stage(
        name,
        step=result.step,
        offset=sum(cfg.recipe.stages[s].steps for s in order[: order.index(name)]),
        order=order,
    )
    run.sinks.write(meter.stage_record(name, step=result.step))
    if result.step == 0:
        positions = {}
        result.valid_start = evaluate(run, ddp, valid_ds, stage, positions)
        run.sinks.write(
            {"stage": name, "step": 0, "tokens": 0, **_valid_record(result.valid_start, positions)}
        )
        log.info("%s validation loss at start: %s", name, _fmt(result.valid_start))

    rank0 = dist.get_rank() == 0
    progress = Progress(
        stage=name,
        total_tokens=steps * stage.batch_tokens,
        start_tokens=result.tokens,
        enabled=cfg.logging.progress and rank0,
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    eval_every = stage.eval_every_tokens // stage.batch_tokens if stage.eval_every_tokens else 0
    save_every = stage.save_every_tokens // stage.batch_tokens if stage.save_every_tokens else 0
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    for step in range(result.step, steps):
        set_step(step + 1)
        is_log = (step + 1) % cfg.logging.log_every_steps == 0 or step + 1 == steps
        t0 = time.time()
        meter.start_step()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        with meter.phase("data_wait"):
            idx = blend.step_indices(
                step, batch_sequences=stage.batch_sequences, dp_rank=dp_rank, dp_size=layout.dp_size
            )
            micro = blend.micro_batches(train_ds, idx, micro_batch=layout.micro_batch)
            ids = metrics.source_ids(train_ds, idx)
            for i, mb in enumerate(micro if ids is not None else []):
                mb["source"] = ids[i * layout.micro_batch : (i + 1) * layout.micro_batch]
        lr = _current_lr(optimizer)
        with meter.phase("forward_backward"):
            loss, by_source = _fwd_bwd(
                run, ddp, micro, seq_length=stage.seq_length, forward_only=False, sources=sources
            )
        if is_log:
            meter.before_update(params)
        with meter.phase("optimizer"):
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=stage.batch_tokens)
        meter.end_step()
        result.step, result.tokens, result.lr = step + 1, result.tokens + stage.batch_tokens, lr
        result.train_seconds += time.time() - t0
        result.train_loss = [result.train_loss[0] if result.train_loss else loss, loss]
        record = {
            "stage": name,
            "step": result.step,
            "tokens": result.tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            **by_source,
        }
        straggler = meter.straggler_check(result.step)
        is_eval = bool(eval_every) and result.step % eval_every == 0 and result.step != steps
        if is_eval:
            record.update(_valid_record(evaluate(run, ddp, valid_ds, stage)))
        if is_log:
            consumed = getattr(train_ds, "dataset_index", None)
            consumed = consumed[: result.step * stage.batch_sequences] if consumed is not None else None
            record.update(
                meter.interval(
                    step=result.step,
                    tokens=result.tokens,
                    params=params,
                    consumed_ids=consumed,
                    extra=straggler,
                )
            )
        if is_log or is_eval:
            run.sinks.write(record)
        progress.update(
            tokens=result.tokens,
            tokens_delta=stage.batch_tokens,
            loss=loss,
            record=record if is_log else None,
        )
        if save_every and result.step % save_every == 0 and result.step != steps:
            result.checkpoint = checkpoint.path_for(directory, result.step)
            checkpoint.save(
                directory,
                model=ddp.module,
                optimizer=optimizer,
                scheduler=scheduler,
                state=vars(result),
                retention=cfg.checkpoint,
            )
    progress.close()
    positions = {}
    result.valid_end = evaluate(run, ddp, valid_ds, stage, positions)
    run.sinks.write(
        {
            "stage": name,
            "step": result.step,
            "tokens": result.tokens,
            **_valid_record(result.valid_end, positions),
        }
    )
    log.info(
        "%s done: %d steps, %d tokens, validation loss %s",
        name,
        result.step,
        result.tokens,
        _fmt(result.valid_end),
    )
    result.final = True
    result.checkpoint = checkpoint.path_for(directory, result.step)
    checkpoint.save(
        directory,
        model=ddp.module,
        optimizer=optimizer,
        scheduler=scheduler,
        state=vars(result),
        retention=cfg.checkpoint,
    )
    return result


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
