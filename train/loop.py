"""One stage of training: build the model for the stage's context and RoPE, start it from random init,
an earlier stage, or its own latest checkpoint, and train for the stage's tokens on its data mix."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from data import blend
from data.prepare import PreparedData
from models.gpt import build_model
from models.hf import is_hf_folder, load_hf_into
from models.llama import padded_vocab_size
from models.moe import expert_load_stats
from parallel.engines import OptimSettings, build_engine, out_of_memory_message
from train import checkpoint, evals, faults, metrics, signals
from train.average import average_into, last_checkpoints
from train.config import TrainConfig
from train.logs import MetricSinks, Progress, set_stage, set_step
from train.ramp import crossed, phase_at, step_micro_batches
from train.schedule import build_scheduler
from train.stability import Guard, for_stage, rollback
from train.stage import StageConfig

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
    valid_avg: dict[str, float] = field(default_factory=dict)
    """Held-out loss of the averaged checkpoints (stage.average_last > 0), next to valid_end's last weights."""
    train_seconds: float = 0.0
    checkpoint: str = ""
    stability_events: int = 0
    """Bad steps (non-finite or spiking loss/grad norm) of the stage (train/stability.py)."""
    evals: dict[str, float] = field(default_factory=dict)
    """Loss inside/beyond the base context (`context/...`, and `unscaled/...` for the model the stage starts
    from at its old RoPE), passkey accuracy (`passkey/...`) and the LR after the last step (`lr_final`)."""

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


def _valid_record(losses: dict[str, float], prefix: str = "valid", positions: dict | None = None) -> dict:
    return {f"{prefix}/{k}": v for k, v in losses.items()} | {
        f"{prefix}_by_position/{k}": v for k, v in (positions or {}).items()
    }


def evaluate(
    run: Run, engine, datasets: dict, stage: StageConfig, positions: dict | None = None
) -> dict[str, float]:
    """Held-out loss per source, over `stage.eval_tokens` tokens (split over data-parallel ranks); the loss
    per position bucket of each source into `positions` when given (and the engine reports it)."""
    from megatron.core import parallel_state

    layout = run.cfg.parallel
    per_step = layout.dp_size * layout.micro_batch
    samples = max(per_step, stage.eval_tokens // stage.seq_length // per_step * per_step)
    out = {}
    engine.eval()
    with torch.no_grad():
        for name, ds in datasets.items():
            idx = blend.step_indices(
                0,
                batch_sequences=samples,
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=layout.dp_size,
            )
            micro = blend.micro_batches(ds, idx, micro_batch=layout.micro_batch)
            out[name] = engine.forward_backward(micro, seq_length=stage.seq_length, forward_only=True)
            by_position = metrics.position_losses(engine)
            if positions is not None and by_position:
                positions[name] = by_position
    engine.train()
    return out


def _current_lr(engine) -> float:
    return engine.param_groups[0]["lr"]


def run_stage(run: Run, name: str, stage: StageConfig, *, init_path: str | None) -> StageResult:
    from megatron.core import parallel_state

    cfg, layout = run.cfg, run.cfg.parallel
    set_stage(name)
    directory = checkpoint.stage_dir(cfg.run_dir, name)
    resume = checkpoint.latest(directory)
    averaged = checkpoint.latest(checkpoint.averaged_dir(directory)) if stage.average_last else None
    if resume is not None and checkpoint.read_state(resume)["final"] and (averaged or not stage.average_last):
        log.info("stage %s is complete (%s); skipping", name, averaged or resume)
        return StageResult(**checkpoint.read_state(averaged or resume))
    config_record = checkpoint.resume_record(cfg, name)
    if resume is not None:
        checkpoint.check_resume(resume, config_record, allow=cfg.resume.allow_config_change)

    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    hf_init = resume is None and init_path is not None and is_hf_folder(init_path)
    fusions = cfg.model.fusion.resolve(run.device.type)
    log.info("%s kernels: %s", name, fusions)

    def make_model(**engine_kwargs) -> torch.nn.Module:
        model = build_model(
            stage.arch(cfg.model.arch()),
            vocab_size=run.vocab_size,
            max_seq_length=stage.seq_length,
            tp=layout.tp,
            sp=layout.sp,
            dtype=dtype,
            attention_backend=cfg.model.attention_backend,
            fusions=fusions,
            **engine_kwargs,
        )
        if hf_init:  # before the engine wraps it: its fp32 main params / ZeRO shards are copied from these
            load_hf_into(model, init_path)
        return model

    plan = stage.plan()  # phases of one batch size and training length (train/ramp.py)
    peak_lr = stage.lr
    if resume is not None:
        peak_lr = checkpoint.read_state(resume)["peak_lr"]
    elif init_path is not None and peak_lr is None:
        peak_lr = checkpoint.read_state(init_path)["lr"]
    # The engine (layout.engine) cuts the model into its stages, wraps it and owns the optimizer.
    engine = build_engine(
        layout,
        build_model=make_model,
        optim=OptimSettings(
            lr=peak_lr,
            min_lr=stage.min_lr,
            weight_decay=stage.weight_decay,
            betas=(stage.adam_beta1, stage.adam_beta2),
            eps=stage.adam_eps,
            clip_grad=stage.clip_grad,
        ),
        device=run.device,
        dtype=dtype,
        grad_accum=layout.accum_steps(plan[0].samples_per_step),  # DeepSpeed follows a batch ramp per step
    )
    order, sources = list(cfg.recipe.stages), sorted(stage.mix)
    meter = metrics.StageMetrics(
        logging_cfg=cfg.logging,
        stage=stage,
        arch=stage.arch(cfg.model.arch()),
        padded_vocab=padded_vocab_size(run.vocab_size, layout.tp),
        device=run.device,
        sources=sources,
        later_tokens=0
        if cfg.only_stage
        else sum(cfg.recipe.stages[s].tokens for s in order[order.index(name) + 1 :]),
        peak_flops=metrics.peak_flops_per_device(
            cfg.logging, gpu=cfg.cluster.gpu, device=run.device, dtype=dtype
        ),
    )
    meter.attach(engine)
    scheduler = build_scheduler(
        engine,
        peak_lr=peak_lr,
        min_lr=stage.min_lr,
        tokens=stage.tokens,
        warmup_tokens=stage.warmup_tokens,
        schedule=stage.schedule,
        decay_tokens=stage.decay_tokens,
        decay_style=stage.decay_style,
        weight_decay=stage.weight_decay,
        branch_tokens=stage.branch_tokens,
    )

    result = StageResult(stage=name, step=0, tokens=0, final=False, peak_lr=peak_lr, lr=peak_lr)
    if resume is not None:
        result = StageResult(
            **checkpoint.load(
                resume,
                engine=engine,
                scheduler=scheduler,
                full_verify=cfg.checkpoint.full_verify,
            )
        )
        log.info("resumed %s at step %d (%d tokens) from %s", name, result.step, result.tokens, resume)
    elif hf_init:
        log.info(
            "initialized %s from the Hugging Face checkpoint %s (peak LR %.3g)", name, init_path, peak_lr
        )
    elif init_path is not None:
        # Keep the previous stage's Adam moments when asked, never its schedule: its param groups carry
        # their own max_lr/min_lr, which megatron-core's scheduler would go on using.
        schedule = [{k: g[k] for k in ("lr", "max_lr", "min_lr") if k in g} for g in engine.param_groups]
        checkpoint.load(init_path, engine=engine, load_optimizer=stage.keep_optimizer)
        for group, own in zip(engine.param_groups, schedule, strict=True):
            group.update(own)
        log.info("initialized %s from %s (peak LR %.3g)", name, init_path, peak_lr)

    # Averaging reads the stage's last checkpoints: retention keeps at least that many.
    retention = dataclasses.replace(
        cfg.checkpoint, keep_last=max(cfg.checkpoint.keep_last, stage.average_last)
    )

    lead_checked = "SLURM_JOB_ID" not in os.environ or dist.get_rank() != 0
    step_seconds = 0.0

    def save() -> None:
        nonlocal lead_checked
        start = time.time()
        result.checkpoint = checkpoint.path_for(directory, result.step)
        checkpoint.save(
            directory,
            engine=engine,
            scheduler=scheduler,
            state=vars(result),
            retention=retention,
            record=config_record,
        )
        if not lead_checked and step_seconds:  # the first save after a step, inside a Slurm job (rank 0)
            lead_checked = True
            lead = cfg.cluster.slurm.signal_lead_s
            if why := signals.lead_too_short(step_s=step_seconds, save_s=time.time() - start, lead_s=lead):
                log.warning(why)

    steps = stage.steps
    train_ds = blend.train_dataset(
        run.prepared,
        mix=stage.mix,
        seq_length=stage.seq_length,
        samples=stage.samples,
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
    base_length = evals.base_context(cfg.recipe.stages, name)
    if result.step == 0:
        positions = {}
        result.valid_start = evaluate(run, engine, valid_ds, stage, positions)
        start = evals.unscaled_baseline(
            engine.modules,
            lambda out: evaluate(run, engine, valid_ds, stage, out),
            stages=cfg.recipe.stages,
            name=name,
            model=cfg.model.arch(),
        )
        result.evals = {k: v for k, v in start.items() if not isinstance(v, list)}
        run.sinks.write(
            {"stage": name, "step": 0, "tokens": 0, **_valid_record(result.valid_start, positions=positions)}
            | evals.context_metrics(
                positions, seq_length=stage.seq_length, base_length=base_length, prefix="context"
            )
            | start
        )
        log.info("%s validation loss at start: %s", name, _fmt(result.valid_start))

    rank0 = dist.get_rank() == 0
    progress = Progress(
        stage=name,
        total_tokens=stage.trained_tokens,
        start_tokens=result.tokens,
        enabled=cfg.logging.progress and rank0,
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    params = [p for m in engine.modules for p in m.parameters() if p.requires_grad]
    stability = for_stage(cfg.stability, stage.stability, key=f"recipe.stages.{name}.stability")
    guard = Guard(stability, stage=name, device=run.device)

    def batch_of(step: int) -> list[dict]:
        return step_micro_batches(
            train_ds, plan, step, dp_rank=dp_rank, dp_size=layout.dp_size, micro_batch=layout.micro_batch
        )

    # The next step's batch is built while this one trains (time/data_wait ~ 0 in steady state).
    loader = blend.Prefetcher(batch_of, end=steps, pin=run.device.type == "cuda")
    for step in range(result.step, steps):
        set_step(step + 1)
        is_log = (step + 1) % cfg.logging.log_every_steps == 0 or step + 1 == steps
        t0 = time.time()
        meter.start_step()
        engine.zero_grad()
        with meter.phase("data_wait"):
            micro = loader.get(step)
        lr = _current_lr(engine)
        phase = phase_at(plan, step)
        try:
            with meter.phase("forward_backward"):
                loss = engine.forward_backward(micro, seq_length=phase.seq_length)
            faults.inject("step", step + 1)  # KILN_FAULT drills only
            if is_log:
                meter.before_update(params)
            with meter.phase("optimizer"):
                # After forward-backward, before the update: all ranks agree whether this step is bad.
                grad_norm = engine.step(accept=lambda norm, s=step + 1, x=loss: guard.check(s, x, norm))
                scheduler.step(increment=phase.batch_tokens)  # a skipped batch is consumed data too
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                out_of_memory_message(
                    stage=name,
                    layout=layout,
                    arch=stage.arch(cfg.model.arch()),
                    vocab_size=run.vocab_size,
                    seq_length=phase.seq_length,
                    micro_batches=len(micro),
                    device=run.device,
                )
            ) from e
        meter.end_step(tokens=phase.batch_tokens, seq_length=phase.seq_length)
        tokens_before = result.tokens
        result.step, result.tokens, result.lr = step + 1, result.tokens + phase.batch_tokens, lr
        step_seconds = time.time() - t0
        result.train_seconds += step_seconds
        event = guard.event(grad_norm)
        if event is not None:  # the update was not applied; the policy says what follows
            loss, grad_norm = guard.loss, guard.grad_norm  # as every rank agreed
            result.stability_events += 1
            if event["action"] == "rollback":
                event["checkpoint"] = rollback(
                    directory,
                    engine=engine,
                    scheduler=scheduler,
                    full_verify=cfg.checkpoint.full_verify,
                )
                if event["checkpoint"] is None:
                    event["action"] = "skip"  # nothing saved in the stage yet to go back to
            run.sinks.write(event)
            if event["action"] == "stop":
                checkpoint.wait_for_saves()  # leave no save cut off by the exit
                progress.close()
                guard.stop(cfg.run_dir)
        result.train_loss = [result.train_loss[0] if result.train_loss else loss, loss]
        record = {
            "stage": name,
            "step": result.step,
            "tokens": result.tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            **metrics.source_losses(engine, sources),
        }
        meter.straggler_check(result.step)  # every logging.straggler_every_steps (all ranks)
        is_eval = crossed(tokens_before, result.tokens, stage.eval_every_tokens) and result.step != steps
        if is_eval:
            record.update(_valid_record(evaluate(run, engine, valid_ds, stage)))
        if is_log:
            consumed = metrics.consumed_sources(train_ds, samples=phase.first_sample_of(result.step))
            extra: dict[
                str, float
            ] = {}  # MoE expert load per layer since the last log, over data-parallel ranks
            for module in engine.modules:
                extra |= expert_load_stats(module, group=parallel_state.get_data_parallel_group())
            record.update(
                meter.interval(
                    step=result.step, tokens=result.tokens, params=params, consumed_ids=consumed, extra=extra
                )
            )
        if is_log or is_eval:
            run.sinks.write(record)
        progress.update(
            tokens=result.tokens,
            tokens_delta=phase.batch_tokens,
            loss=loss,
            record=record if is_log else None,
        )
        checkpoint.wait_for_saves(blocking=False)  # completes async saves written meanwhile
        branch_end = result.tokens in stage.branch_tokens  # schedule=wsd_s: a decayed model to keep
        periodic = crossed(tokens_before, result.tokens, stage.save_every_tokens)
        if (branch_end or periodic) and result.step != steps:
            save()
        if signals.stop_requested(run.device):  # Slurm's USR1/TERM or the stop file, agreed by every rank
            if result.checkpoint != checkpoint.path_for(directory, result.step):
                save()
            checkpoint.wait_for_saves()
            progress.close()
            signals.stop(
                run_dir=cfg.run_dir,
                max_restarts=cfg.cluster.slurm.max_restarts,
                stage=name,
                step=result.step,
                checkpoint=result.checkpoint,
            )
    loader.close()
    progress.close()
    positions = {}
    result.valid_end = evaluate(run, engine, valid_ds, stage, positions)
    end = evals.context_metrics(
        positions, seq_length=stage.seq_length, base_length=base_length, prefix="context"
    )
    end |= evals.stage_passkey(
        engine,
        stage,
        layout=layout,
        tokenizer_path=run.prepared.tokenizer_path,
        vocab_size=run.vocab_size,
        device=run.device,
    )
    end["lr_final"] = _current_lr(engine)
    result.evals |= end
    run.sinks.write(
        {
            "stage": name,
            "step": result.step,
            "tokens": result.tokens,
            **_valid_record(result.valid_end, positions=positions),
            **end,
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
    save()
    if stage.average_last:
        average_into(engine, last_checkpoints(directory, stage.average_last))
        result.valid_avg = evaluate(run, engine, valid_ds, stage)
        run.sinks.write(
            {"stage": name, "step": result.step, **_valid_record(result.valid_avg, prefix="valid_avg")}
        )
        log.info(
            "%s: average of the last %d checkpoints: %s", name, stage.average_last, _fmt(result.valid_avg)
        )
        result.checkpoint = checkpoint.path_for(checkpoint.averaged_dir(directory), result.step)
        checkpoint.save(
            checkpoint.averaged_dir(directory),
            engine=engine,
            scheduler=scheduler,
            state=vars(result),
            retention=retention,
            record=config_record,
        )
    return result


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
