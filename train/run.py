"""A whole run on this process (one rank of torchrun, or a world of one): data, then the recipe's stages
chained by checkpoints, then the report."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch
import torch.distributed as dist

from data.prepare import load_prepared, prepare_data, prepared_dir
from data.tokenizer import load_tokenizer
from models.hf import is_hf_folder
from models.llama import padded_vocab_size
from parallel import engine
from train import checkpoint, faults, signals
from train.config import TrainConfig
from train.logs import MetricSinks, set_stage, setup_logging
from train.loop import Run, StageResult, run_stage
from train.plots import write_prediction
from train.report import format_report, greedy_sample, write_run_report
from train.stability import DIVERGED_EXIT_CODE, DivergenceError

log = logging.getLogger(__name__)


def init_checkpoint(cfg: TrainConfig, init_from: str | None) -> str | None:
    """The checkpoint a stage starts from: the final checkpoint of an earlier stage, a given Kiln checkpoint
    directory, or a Hugging Face folder (config.json + safetensors)."""
    if init_from is None:
        return None
    if init_from not in cfg.recipe.stages and is_hf_folder(init_from):
        return init_from  # continued pre-training from a Hugging Face checkpoint (weights only)
    directory = checkpoint.stage_dir(cfg.run_dir, init_from) if init_from in cfg.recipe.stages else init_from
    if checkpoint.latest(checkpoint.averaged_dir(directory)) is not None:
        directory = checkpoint.averaged_dir(directory)  # a stage that averaged its checkpoints hands that on
    path = (
        directory
        if os.path.exists(os.path.join(directory, checkpoint.STATE_FILE))
        else checkpoint.latest(directory)
    )
    if path is None or (init_from in cfg.recipe.stages and not checkpoint.read_state(path)["final"]):
        raise RuntimeError(
            f"init_from={init_from!r}: no complete checkpoint in {directory}; run that stage first"
        )
    return path


def run(cfg: TrainConfig) -> list[StageResult]:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and os.environ.get("LOCAL_RANK") == "0":
        # torchrun restarted the workers (parallel.max_restarts): end what the dead attempt left running.
        faults.kill_leftovers({"TORCHELASTIC_RUN_ID": os.environ["TORCHELASTIC_RUN_ID"]}, older_attempts=True)
    device = engine.pick_device(cfg.device)
    engine.init_distributed(device)
    signals.install()  # USR1/TERM: checkpoint and requeue at the next step end
    rank = dist.get_rank()
    setup_logging(
        rank=rank, level=cfg.logging.level, log_file=os.path.join(cfg.run_dir, "logs", f"rank{rank}.log")
    )
    try:
        return _run(cfg, device)
    except DivergenceError as e:  # stability: policy stop, or too many bad steps (train/stability.py)
        log.error("diverged: %s", e)
        sys.exit(DIVERGED_EXIT_CODE)
    finally:
        engine.destroy()


def _run(cfg: TrainConfig, device: torch.device) -> list[StageResult]:
    engine.init_model_parallel(cfg.parallel, seed=cfg.seed, device=device)
    if dist.get_rank() == 0:
        prepared = prepare_data(cfg.data)
    dist.barrier()
    if dist.get_rank() != 0:
        prepared = load_prepared(prepared_dir(cfg.data))
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    sinks = MetricSinks(
        run_dir=cfg.run_dir,
        run_name=f"{cfg.experiment}/{cfg.name}",
        wandb_cfg=cfg.logging.wandb,
        tensorboard=cfg.logging.tensorboard,
        config=dataclasses.asdict(cfg),
        enabled=dist.get_rank() == 0,
    )
    if cfg.logging.predicted and dist.get_rank() == 0:  # the planner's numbers, for the report
        write_prediction(cfg.run_dir, cfg.logging.predicted)
    run = Run(cfg=cfg, device=device, prepared=prepared, vocab_size=tokenizer.vocab_size, sinks=sinks)
    log.info(
        "run %s: world %d (tp %d, dp %d), device %s, vocab %d (padded %d)",
        cfg.run_dir,
        dist.get_world_size(),
        cfg.parallel.tp,
        cfg.parallel.dp_size,
        device,
        tokenizer.vocab_size,
        padded_vocab_size(tokenizer.vocab_size, cfg.parallel.tp),
    )
    results = []
    try:
        for name, stage in cfg.recipe.stages.items():
            if cfg.only_stage is not None and name != cfg.only_stage:
                continue
            results.append(run_stage(run, name, stage, init_path=init_checkpoint(cfg, stage.init_from)))
        set_stage("-")
        sample = greedy_sample(cfg, results[-1], run=run, tokenizer=tokenizer)
    finally:
        sinks.close()
    if dist.get_rank() == 0:
        report = format_report(cfg, results, sample=sample)
        with open(os.path.join(cfg.run_dir, "report.md"), "w") as f:
            f.write(report + "\n")
        # N, D, C and the final loss for scaling-law fits (python -m parallel.plan.fit).
        from parallel.plan.sweep import write_record

        write_record(cfg, results, vocab_size=padded_vocab_size(tokenizer.vocab_size, cfg.parallel.tp))
        print(report, flush=True)  # the job's product on stdout
        try:  # pictures must never fail a finished run
            log.info("run report: %s", write_run_report(cfg.run_dir))
        except Exception as e:  # noqa: BLE001
            log.warning("could not render the run report (python -m train.report %s): %r", cfg.run_dir, e)
    return results
