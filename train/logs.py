"""Rank-aware logging, the rank-0 progress display, and metric sinks (JSONL file, wandb, TensorBoard).

Metrics are computed once per logging step (train/metrics.py) and written to every sink on one x-axis, the
recipe-wide `global_step`; `metrics.jsonl` in the run directory is the source of truth for tests and plots.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from train.metrics import fmt_eta

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("megatron", "torch.distributed", "wandb", "hydra", "urllib3", "filelock", "datasets")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.stage = "-"
        self.step = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.stage = self.stage
        record.step = self.step
        return True


_filter = _RankFilter(0)


def setup_logging(*, rank: int, level: str = "INFO", log_file: str | None = None) -> None:
    """Prefix every line with time, rank and stage. Non-zero ranks log warnings and errors only, so a
    job's output is rank 0's story plus every rank's problems."""
    _filter.rank = rank
    fmt = logging.Formatter(
        "%(asctime)s [r%(rank)d %(stage)s s%(step)s] %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"
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
    _filter.step = "-"


def set_step(step: int) -> None:
    """The step shown in every log line's prefix (the step being trained)."""
    _filter.step = str(step)


class Progress:
    """Rank 0: a tqdm bar (tokens, loss, tokens/s, ETA) when the output is a terminal; otherwise (Slurm
    logs, CI) a log line on logging steps. Other ranks: silent."""

    def __init__(
        self, *, stage: str, total_tokens: int, start_tokens: int, enabled: bool, stream=None
    ) -> None:
        self.stage = stage
        self.total = total_tokens
        self.enabled = enabled
        self.bar = None
        stream = stream if stream is not None else sys.stderr
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_tokens,
                initial=start_tokens,
                unit="tok",
                unit_scale=True,
                desc=stage,
                dynamic_ncols=True,
                leave=True,
                file=stream,
            )

    def update(self, *, tokens: int, tokens_delta: int, loss: float, record: dict | None) -> None:
        """`record`: the logging step's metrics (None between logging steps)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(tokens_delta)
            if record is not None:
                self.bar.set_postfix(
                    loss=f"{loss:.3f}",
                    tok_s=f"{record.get('tokens_per_s', 0):,.0f}",
                    eta=fmt_eta(record.get("eta/stage_s", 0)),
                )
        elif record is not None:
            log.info(
                "%s %5.1f%% tokens %d/%d loss %.4f %.0f tok/s%s ETA stage %s recipe %s",
                self.stage,
                100 * tokens / self.total,
                tokens,
                self.total,
                loss,
                record.get("tokens_per_s", 0.0),
                f" MFU {record['mfu']:.1%}" if "mfu" in record else "",
                fmt_eta(record.get("eta/stage_s", 0)),
                fmt_eta(record.get("eta/recipe_s", 0)),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _numbers(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricSinks:
    """Rank 0 writes each metrics record to `metrics.jsonl`, wandb and TensorBoard, at the record's
    `global_step` (steps of the recipe's earlier stages + the stage's step).

    wandb is offline by default (never needs network). Its run id is made once and kept in
    `<run_dir>/wandb_run_id`, so a resumed or requeued run continues the same wandb run.
    """

    def __init__(
        self, *, run_dir: str, run_name: str, wandb_cfg, tensorboard: bool, config: dict, enabled: bool
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        self.tb = None
        self.tensorboard = tensorboard
        self.offset = 0
        self.file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=run_name,
                id=wandb_run_id(run_dir),
                resume="allow",
                dir=run_dir,
                mode=wandb_cfg.mode,
                config=config,
            )

    def begin_stage(self, stage: str, *, step: int, offset: int, order: list[str]) -> None:
        """Start writing `stage` (the recipe's stages are `order`) at `step`; records of this stage from
        step on (after `step` when resuming from it) and of later stages are dropped from the JSONL, so a
        resumed run continues the series without duplicated steps."""
        self.offset = offset
        if not self.enabled:
            return
        if self.file is None:
            rewind_jsonl(self.path, stage=stage, step=step, order=order)
            self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        if self.tensorboard and self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed attempt wrote past the resume point.
            self.tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=offset + step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "global_step": record.get("global_step", self.offset + record["step"])}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = _numbers(record)
        step = numbers.pop("global_step")
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(run_dir: str) -> str:
    """The run's wandb id: made once (8 random lowercase letters and digits, the form wandb makes) and kept
    in `<run_dir>/wandb_run_id`."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def rewind_jsonl(path: str, *, stage: str, step: int, order: list[str]) -> int:
    """Drop records at or past (stage, step) in recipe order, keeping (stage, step) itself when step > 0
    (its training record was logged before the checkpoint being resumed was saved). Returns the number
    of records dropped."""
    if not os.path.exists(path):
        return 0
    rank = {name: i for i, name in enumerate(order)}
    here = (rank[stage], step)
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        rec = json.loads(line)
        pos = (rank.get(rec.get("stage"), -1), rec.get("step", 0))
        if pos < here or (pos == here and step > 0):
            kept.append(line)
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        log.info("metrics: dropped %d records past %s step %d (resumed)", len(lines) - len(kept), stage, step)
    return len(lines) - len(kept)
