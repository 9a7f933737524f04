"""One stage of training: build the model for the stage's context and RoPE, start it from random init,
an earlier stage, or its own latest checkpoint, and train for the stage's tokens on its data mix."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from data import blend
from data.prepare import PreparedData
from models.llama import build_model
from parallel import engine
from train import checkpoint, signals
from train.config import StageConfig, TrainConfig
from train.logs import MetricSinks, Progress, set_stage
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


def _forward_step(data_iterator, model):
    """megatron-core forward step: per-token losses summed over the loss mask; the schedule divides by
    the token count (and micro-batches), and the reported [sum, count] pair gives an exact token mean."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"]
    )  # (batch, seq) losses
    mask = batch["loss_mask"]

    def loss_func(losses: torch.Tensor):
        loss = (losses.float() * mask).sum()
        count = mask.sum().to(torch.int)
        return loss, count, {"lm loss": torch.stack([loss.detach().clone(), count.float()])}

    return output, loss_func


def _dp_mean(pairs: list[torch.Tensor]) -> float:
    """Token-mean loss over this rank's micro-batches and its data-parallel peers, from [sum, count] pairs."""
    from megatron.core import parallel_state

    total = torch.stack(pairs).sum(dim=0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


def _fwd_bwd(run: Run, ddp, micro: list[dict], *, seq_length: int, forward_only: bool) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter([_to(mb, run.device) for mb in micro]),
        model=[ddp],
        num_microbatches=len(micro),
        seq_length=seq_length,
        micro_batch_size=run.cfg.parallel.micro_batch,
        forward_only=forward_only,
    )
    return _dp_mean([entry["lm loss"] for entry in losses])


def _valid_record(losses: dict[str, float]) -> dict[str, float]:
    return {f"valid/{k}": v for k, v in losses.items()}


def evaluate(run: Run, ddp, datasets: dict, stage: StageConfig) -> dict[str, float]:
    """Held-out loss per source, over `stage.eval_tokens` tokens (split over data-parallel ranks)."""
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
            out[name] = _fwd_bwd(run, ddp, micro, seq_length=stage.seq_length, forward_only=True)
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
    if result.step == 0:
        result.valid_start = evaluate(run, ddp, valid_ds, stage)
        run.sinks.write({"stage": name, "step": 0, "tokens": 0, **_valid_record(result.valid_start)})
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
    window_start, window_tokens = time.time(), 0
    for step in range(result.step, steps):
        t0 = time.time()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        idx = blend.step_indices(
            step, batch_sequences=stage.batch_sequences, dp_rank=dp_rank, dp_size=layout.dp_size
        )
        micro = blend.micro_batches(train_ds, idx, micro_batch=layout.micro_batch)
        lr = _current_lr(optimizer)
        loss = _fwd_bwd(run, ddp, micro, seq_length=stage.seq_length, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=stage.batch_tokens)
        result.step, result.tokens, result.lr = step + 1, result.tokens + stage.batch_tokens, lr
        result.train_seconds += time.time() - t0
        result.train_loss = [result.train_loss[0] if result.train_loss else loss, loss]
        window_tokens += stage.batch_tokens
        record = {
            "stage": name,
            "step": result.step,
            "tokens": result.tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
        }
        is_log = result.step % cfg.logging.log_every_steps == 0 or result.step == steps
        is_eval = bool(eval_every) and result.step % eval_every == 0 and result.step != steps
        if is_eval:
            record.update(_valid_record(evaluate(run, ddp, valid_ds, stage)))
        if is_log or is_eval:
            elapsed = time.time() - window_start
            record["tokens_per_s"] = window_tokens / elapsed
            window_start, window_tokens = time.time(), 0
            run.sinks.write(record)
        tps = result.tokens / result.train_seconds
        progress.update(
            tokens=result.tokens,
            tokens_delta=stage.batch_tokens,
            loss=loss,
            tokens_per_s=tps,
            eta_s=(steps - result.step) * stage.batch_tokens / tps,
            log_line=is_log,
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
        if signals.stop_requested(run.device):  # Slurm's USR1/TERM or the stop file, agreed by every rank
            if result.checkpoint != checkpoint.path_for(directory, result.step):
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
            signals.stop(
                run_dir=cfg.run_dir,
                max_restarts=cfg.cluster.slurm.max_restarts,
                stage=name,
                step=result.step,
                checkpoint=result.checkpoint,
            )
    progress.close()
    result.valid_end = evaluate(run, ddp, valid_ds, stage)
    run.sinks.write(
        {
            "stage": name,
            "step": result.step,
            "tokens": result.tokens,
            **_valid_record(result.valid_end),
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
