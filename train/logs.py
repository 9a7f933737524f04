"""Rank-aware logging, the rank-0 progress display, and metric sinks (JSONL file + wandb).

Metrics are computed once per logging step and written to every sink; `metrics.jsonl` in the run
directory is the source of truth for tests and plots.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("megatron", "torch.distributed", "wandb", "hydra", "urllib3", "filelock", "datasets")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.stage = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.stage = self.stage
        return True


_filter = _RankFilter(0)


def setup_logging(*, rank: int, level: str = "INFO", log_file: str | None = None) -> None:
    """Prefix every line with time, rank and stage. Non-zero ranks log warnings and errors only, so a
    job's output is rank 0's story plus every rank's problems."""
    _filter.rank = rank
    fmt = logging.Formatter(
        "%(asctime)s [r%(rank)d %(stage)s] %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_filter)
        root.addHandler(h)
    root.setLevel(level if rank == 0 else "WARNING")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel("WARNING")
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)


def set_stage(stage: str) -> None:
    _filter.stage = stage


class Progress:
    """Rank 0: a tqdm bar (tokens, loss, tokens/s, ETA) on a terminal; periodic log lines otherwise
    (Slurm logs, CI). Other ranks: silent."""

    def __init__(self, *, stage: str, total_tokens: int, start_tokens: int, enabled: bool) -> None:
        self.stage = stage
        self.total = total_tokens
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_tokens,
                initial=start_tokens,
                unit="tok",
                unit_scale=True,
                desc=stage,
                dynamic_ncols=True,
                leave=True,
            )

    def update(
        self,
        *,
        tokens: int,
        tokens_delta: int,
        loss: float,
        tokens_per_s: float,
        eta_s: float,
        log_line: bool,
    ) -> None:
        if self.bar is not None:
            self.bar.update(tokens_delta)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        elif log_line:
            log.info(
                "%s %5.1f%% tokens %d/%d loss %.4f %.0f tok/s ETA %s",
                self.stage,
                100 * tokens / self.total,
                tokens,
                self.total,
                loss,
                tokens_per_s,
                time.strftime("%H:%M:%S", time.gmtime(eta_s)),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricSinks:
    """Rank 0 writes each metrics record to `metrics.jsonl` and wandb (offline by default: never needs
    network; the wandb run id is the run name, so a re-launched run continues the same wandb run)."""

    def __init__(self, *, run_dir: str, run_name: str, wandb_cfg, config: dict, enabled: bool) -> None:
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
        if wandb_cfg.mode != "disabled":
            import wandb

            run_id = run_name.replace("/", "-")
            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=run_dir,
                mode=wandb_cfg.mode,
                config=config,
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(
                {f"{record['stage']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
