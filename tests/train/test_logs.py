"""Progress display, log prefixes, metric-sink bookkeeping (JSONL rewind, stable wandb id), straggler
arithmetic and the logging config's checks: fast unit tests, no training."""

from __future__ import annotations

import io
import json
import logging

import pytest

from train.config import LoggingConfig
from train.errors import ConfigError
from train.logs import Progress, rewind_jsonl, set_stage, set_step, setup_logging, wandb_run_id
from train.metrics import find_stragglers, fmt_eta

RECORD = {"tokens_per_s": 12_345.0, "eta/stage_s": 3725.0, "eta/recipe_s": 90_061.0, "mfu": 0.412}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_a_terminal_logs_a_line_per_logging_step(caplog):
    stream = io.StringIO()  # Slurm log or CI: not a terminal
    progress = Progress(stage="base", total_tokens=8192, start_tokens=0, enabled=True, stream=stream)
    assert progress.bar is None
    with caplog.at_level(logging.INFO, logger="train.logs"):
        progress.update(tokens=2048, tokens_delta=2048, loss=7.0, record=None)  # not a logging step
        progress.update(tokens=4096, tokens_delta=2048, loss=6.5, record=RECORD)
    progress.close()
    assert stream.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == [
        "base  50.0% tokens 4096/8192 loss 6.5000 12345 tok/s MFU 41.2% ETA stage 01:02:05 recipe 1d 01:01:01"
    ]


def test_progress_on_a_terminal_draws_a_bar_and_logs_nothing(caplog):
    stream = FakeTTY()
    progress = Progress(stage="base", total_tokens=8192, start_tokens=2048, enabled=True, stream=stream)
    with caplog.at_level(logging.INFO, logger="train.logs"):
        progress.update(tokens=4096, tokens_delta=2048, loss=6.5, record=RECORD)
    progress.close()
    assert not caplog.records
    out = stream.getvalue()
    assert "base" in out and "4.10k/8.19k" in out and "loss=6.500" in out and "eta=01:02:05" in out


def test_progress_is_silent_off_rank_0(caplog):
    stream = FakeTTY()
    progress = Progress(stage="base", total_tokens=8192, start_tokens=0, enabled=False, stream=stream)
    with caplog.at_level(logging.INFO, logger="train.logs"):
        progress.update(tokens=4096, tokens_delta=2048, loss=6.5, record=RECORD)
    assert stream.getvalue() == "" and not caplog.records


def test_log_lines_carry_rank_stage_and_step(tmp_path):
    log_file = tmp_path / "logs" / "rank3.log"
    setup_logging(rank=3, log_file=str(log_file))
    try:
        set_stage("anneal")
        set_step(17)
        logging.getLogger("train.x").warning("slow disk")
        logging.getLogger("train.x").info("not shown off rank 0")
    finally:
        set_stage("-")
        setup_logging(rank=0)
    lines = log_file.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("[r3 anneal s17] W train.x: slow disk")


def test_eta_format_goes_past_a_day():
    assert fmt_eta(59) == "00:00:59"
    assert fmt_eta(86400 * 3 + 3600 + 61) == "3d 01:01:01"
    assert fmt_eta(-5) == "00:00:00"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_rewind_drops_records_past_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    order = ["base", "long_context", "anneal"]
    records = [{"stage": "base", "step": s} for s in range(0, 9)] + [
        {"stage": "long_context", "step": s} for s in (0, 1, 2)
    ]
    _write(path, records)
    assert rewind_jsonl(str(path), stage="base", step=6, order=order) == 5  # base 7, 8 and long_context
    assert [(r["stage"], r["step"]) for r in map(json.loads, path.open())] == [("base", s) for s in range(7)]
    # A stage restarting from step 0 drops its own step-0 records (they are written again).
    _write(path, records)
    assert rewind_jsonl(str(path), stage="long_context", step=0, order=order) == 3
    assert rewind_jsonl(str(path), stage="long_context", step=0, order=order) == 0
    assert rewind_jsonl(str(tmp_path / "none.jsonl"), stage="base", step=0, order=order) == 0


def test_wandb_run_id_is_made_once_and_kept(tmp_path):
    first = wandb_run_id(str(tmp_path))
    assert len(first) == 8 and first.isalnum() and first == first.lower()
    assert (tmp_path / "wandb_run_id").read_text() == first + "\n"
    assert wandb_run_id(str(tmp_path)) == first
    (tmp_path / "other").mkdir()
    assert wandb_run_id(str(tmp_path / "other")) != first  # another run, another wandb run


def test_stragglers_are_ranks_slower_than_median_by_the_factor():
    assert find_stragglers([0.10, 0.11, 0.30, 0.10], factor=1.5) == ([2], 0.10)
    assert find_stragglers([0.10, 0.40], factor=1.5) == ([1], 0.10)  # two ranks: the lower middle value
    assert find_stragglers([0.10, 0.14], factor=1.5) == ([], 0.10)
    assert find_stragglers([0.2] * 8, factor=1.5) == ([], 0.2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("peak_tflops", 0.0, "logging.peak_tflops=0.0: must be > 0 TFLOP/s, or null"),
        ("straggler_factor", 1.0, "logging.straggler_factor=1.0: must be > 1"),
        ("straggler_every_steps", -1, "logging.straggler_every_steps=-1: must be >= 0"),
        ("flops_convention", "palm", "logging.flops_convention='palm': choose megatron or torchtitan"),
    ],
)
def test_logging_config_refuses_bad_values(field, value, message):
    with pytest.raises(ConfigError) as err:
        LoggingConfig(**{field: value})
    assert message in str(err.value)


def test_peak_flops_come_from_the_override_or_the_device_table():
    import torch

    from train.metrics import peak_flops_per_device

    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32
    # H100 SXM: 989.4 TFLOP/s dense BF16 (parallel/plan/hardware.py, from NVIDIA's data sheet).
    assert peak_flops_per_device(LoggingConfig(), gpu="h100_sxm", device=cpu, dtype=bf16) == 989.4e12
    assert peak_flops_per_device(LoggingConfig(), gpu="a100", device=cpu, dtype=fp32) == 19.5e12
    assert peak_flops_per_device(LoggingConfig(), gpu="cpu", device=cpu, dtype=fp32) == 0.1e12
    assert peak_flops_per_device(LoggingConfig(peak_tflops=2.5), gpu="h200", device=cpu, dtype=bf16) == 2.5e12
    assert peak_flops_per_device(LoggingConfig(), gpu="tpu_v5", device=cpu, dtype=bf16) is None
