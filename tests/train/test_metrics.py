"""Metrics of a real (short, world-of-one CPU) run read back from its sinks: JSONL numbers against the step
time and the FLOPs formula, per-source losses against the batch loss, wandb and TensorBoard holding the same
series, and a resumed run continuing the series without duplicated steps."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL, read_metrics, run_train

PEAK_TFLOPS = 0.5
RUN = SMALL + [
    "parallel=single",
    "parallel.micro_batch=2",
    "logging.wandb.mode=offline",
    f"logging.peak_tflops={PEAK_TFLOPS}",
    "++logging.predicted={time/step: 0.25, mfu: 0.125}",  # as a config from python -m parallel.plan has it
    "recipe.stages.base.tokens=16384",  # 8 steps of 8 sequences x 256 tokens
    "recipe.stages.base.batch_tokens=2048",
    "recipe.stages.base.warmup_tokens=2048",
    "recipe.stages.base.save_every_tokens=4096",
    "recipe.stages.long_context.tokens=4096",  # 2 steps at context 512
    "recipe.stages.long_context.batch_tokens=2048",
    "recipe.stages.long_context.warmup_tokens=0",
    "recipe.stages.long_context.seq_length=512",
    "recipe.stages.anneal.tokens=4096",  # 2 steps at context 512
    "recipe.stages.anneal.seq_length=512",
    "recipe.stages.anneal.batch_tokens=2048",
    "recipe.stages.anneal.average_last=0",  # 2 steps: too few checkpoints to average
]
STEPS = {"base": 8, "long_context": 2, "anneal": 2}
SEQ = {"base": 256, "long_context": 512, "anneal": 512}


@pytest.fixture(scope="module")
def run1(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("metrics") / "run"
    start = time.time()
    run_train(
        [*RUN, f"run_dir={run_dir}", f"data.cache_dir={data_cache}"], cwd=ROOT, env={"WANDB_MODE": "offline"}
    )
    return run_dir, time.time() - start


def intervals(records: list[dict]) -> list[dict]:
    return [r for r in records if "tokens_per_s" in r]


def test_throughput_and_mfu_follow_step_time_and_flops_formula(run1):
    run_dir, wall = run1
    records = read_metrics(run_dir)
    rows = intervals(records)
    assert [(r["stage"], r["step"]) for r in rows] == [
        (s, i) for s, n in STEPS.items() for i in range(1, n + 1)
    ]
    # Megatron-LM's FLOPs per token of the test model (h 128, 4 heads of 32, 2 KV heads, 2 layers, FFN 352,
    # vocab 1024): 6 x (attention 2x(128*128 + 2*128*64 + 128*128) + MLP 2x3x128x352 + logits 1024x128)
    # + causal scores 12 x 2 layers x 128 x seq / 2.
    linear = 6 * (2 * (128 * 128 + 2 * 128 * 64 + 128 * 128) + 2 * 3 * 128 * 352 + 1024 * 128)
    for r in rows:
        fpt = linear + 12 * 2 * 128 * SEQ[r["stage"]] / 2
        assert r["flops_per_token"] == fpt
        assert r["tokens_per_s"] == pytest.approx(2048 / r["time/step"], rel=1e-12)
        assert r["tokens_per_s_per_gpu"] == r["tokens_per_s"]  # a world of one
        assert r["tflops_per_gpu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / PEAK_TFLOPS, rel=1e-12)
        # The phases cover the step: what is left is zero_grad and Python between them.
        phases = r["time/data_wait"] + r["time/forward_backward"] + r["time/optimizer"]
        assert 0.8 * r["time/step"] <= phases <= r["time/step"]
        assert 0 <= r["time/grad_sync"] <= r["time/forward_backward"]
        assert 0.05 < r["mem/rss_gb"] < 16
    assert linear + 12 * 2 * 128 * 256 / 2 == 3_391_488
    # Step times add up to less than the whole run (which also prepares, evaluates and checkpoints) ...
    assert sum(r["time/step"] for r in rows) < wall
    # ... and the logged rate agrees with the loop's own clock over the stage (report.md's tokens/s).
    report = (run_dir / "report.md").read_text()
    base_row = next(line for line in report.splitlines() if line.startswith("| base |"))
    loop_tps = float(base_row.split("|")[-3].replace(",", ""))
    base = [r["tokens_per_s"] for r in rows if r["stage"] == "base"]
    assert 8 / sum(1 / t for t in base) == pytest.approx(loop_tps, rel=0.1)


def test_per_source_loss_and_data_position_add_up(run1):
    records = read_metrics(run1[0])
    starts = {r["stage"]: r for r in records if r.get("event") == "stage_start"}
    assert starts["base"]["planned/code"] == pytest.approx(0.7) and starts["anneal"]["planned/docs"] == 0.7
    for stage, n in STEPS.items():
        rows = [r for r in intervals(records) if r["stage"] == stage]
        sequences = 2048 // SEQ[stage]
        prev = {"code": 0, "docs": 0}
        for r in rows:
            counts = {s: r[f"data/{s}/samples"] for s in prev}
            assert sum(counts.values()) == r["step"] * sequences
            assert r["data/code/fraction"] == pytest.approx(counts["code"] / sum(counts.values()))
            # Every token of a sample counts (no loss mask), so the batch loss is the sample-weighted
            # mean of the per-source losses of this step.
            new = {s: counts[s] - prev[s] for s in prev}
            mean = sum(new[s] * r.get(f"loss/{s}", 0.0) for s in prev) / sequences
            assert r["loss"] == pytest.approx(mean, rel=1e-6)
            assert all((f"loss/{s}" in r) == (new[s] > 0) for s in prev)
            prev = counts
        assert rows[-1]["eta/recipe_s"] > 0 or stage == "anneal"
        assert rows[-1]["eta/stage_s"] == 0.0 and rows[0]["eta/stage_s"] > 0 or n == 1
    base = [r for r in intervals(records) if r["stage"] == "base"]
    # ETA of the recipe = the stage's + the later stages' 8192 tokens at the current rate.
    assert base[0]["eta/recipe_s"] == pytest.approx(base[0]["eta/stage_s"] + 8192 / base[0]["tokens_per_s"])
    assert base[0]["eta/stage_s"] == pytest.approx(7 * base[0]["time/step"])
    # Update/parameter norm ratio: exactly 0 at the warm-up's LR of 0; else Adam moves each of the N
    # weights by about lr (|m/sqrt(v)| ~ 1), so ||update|| / ||params|| ~ lr sqrt(N) / ||params||.
    n_params = 2 * 1024 * 128 + 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128) + 2 * 3 * 128 * 352 + 5 * 128
    assert base[0]["lr"] == 0.0 and base[0]["update_ratio"] == 0.0
    for r in intervals(records)[1:]:
        adam_scale = r["update_ratio"] / (r["lr"] * n_params**0.5 / r["param_norm"])
        assert 0.2 < adam_scale < 1.5, r["step"]


def _leveldb_records(path: str):
    """Records of a wandb transaction log (LevelDB log format: 32 KiB blocks of chunks, each with a 7-byte
    header checksum/length/type; wandb prepends its own 7-byte header ':W&B' + magic + version)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """History rows of every offline wandb run in the run dir, by step (a resumed run adds a directory)."""
    rows: dict[int, dict] = {}
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))):
        for record in _leveldb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                rows.setdefault(record.history.step.num, {}).update(items)
    return rows


def test_wandb_offline_run_holds_the_same_metrics(run1):
    run_dir = run1[0]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8
    dirs = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))
    assert len(dirs) == 1
    history = wandb_history(run_dir)
    records = read_metrics(run_dir)
    assert sorted(history) == sorted({r["global_step"] for r in records}) == list(range(13))
    for r in intervals(records):
        row = history[r["global_step"]]
        for key in ("loss", "lr", "tokens_per_s", "mfu", "time/step", "data/code/samples"):
            assert row[key] == r[key], key


def test_tensorboard_holds_the_same_series(run1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run1[0] / "tensorboard"))
    acc.Reload()
    rows = intervals(read_metrics(run1[0]))
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(loss) == [r["global_step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert loss[r["global_step"]] == pytest.approx(r["loss"], rel=1e-6)  # stored as float32
    assert {e.step for e in acc.Scalars("valid/code")} == {0, 8, 10, 12}


def test_report_renders_every_png_of_the_run(run1):
    from PIL import Image

    report = run1[0] / "report"
    pngs = sorted(os.path.basename(p) for p in glob.glob(str(report / "*.png")))
    assert pngs == [
        "data_mix.png",
        "loss.png",
        "lr.png",
        "planner.png",
        "position_loss.png",
        "step_time.png",
        "throughput.png",
    ]
    for name in pngs:
        assert Image.open(report / name).size == (800, 450)
        assert (report / name).stat().st_size > 10_000
    index = (report / "index.md").read_text()
    assert all(f"]({name})" in index for name in pngs)
    assert "| base | 8 | 16,384 |" in index
    assert "Not recorded in this run: MoE expert load." in index
    html = (report / "index.html").read_text()
    assert html.count("<img ") == 7 and "<td>base</td>" in html
    # The run kept the planner's prediction (logging.predicted) for the report's comparison.
    plan = json.loads((run1[0] / "plan.json").read_text())
    assert plan == {"predicted": {"time/step": 0.25, "mfu": 0.125}}


@pytest.mark.slow  # a second run
def test_resumed_run_continues_the_series_without_duplicates(run1, tmp_path, data_cache):
    """Cut the run back to base's step-6 checkpoint, as a requeued job would find it, and run again: the
    JSONL, wandb and TensorBoard continue from step 6 with identical losses and no duplicated steps."""
    first, _ = run1
    run_dir = tmp_path / "run"
    shutil.copytree(first, run_dir)
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt / "long_context")
    shutil.rmtree(ckpt / "anneal")
    shutil.rmtree(ckpt / "base" / "step_000008")
    (ckpt / "base" / "latest").write_text("step_000006")
    proc = run_train(
        [*RUN, f"run_dir={run_dir}", f"data.cache_dir={data_cache}"], cwd=ROOT, env={"WANDB_MODE": "offline"}
    )
    assert "resumed base at step 6" in proc.stderr
    # base steps 7 and 8 and its final evaluation; 5 records of each later stage (start, evaluation at
    # step 0, steps 1 and 2, final evaluation).
    assert "dropped 13 records past base step 6" in proc.stderr
    before, after = read_metrics(first), read_metrics(run_dir)
    keys = [(r["stage"], r["step"], r.get("event"), "loss" in r) for r in after]
    assert len(keys) == len(set(keys)) == len(before) + 1  # + the stage-start record of the resume
    assert [(r["global_step"], r["loss"]) for r in intervals(after)] == [
        (r["global_step"], r["loss"]) for r in intervals(before)
    ]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))) == 2  # same wandb run
    history = wandb_history(run_dir)
    assert [history[g]["loss"] for g in range(1, 13)] == [r["loss"] for r in intervals(after)]


@pytest.mark.slow
def test_straggler_is_named_and_its_wait_shows_on_the_others(tmp_path, data_cache):
    """2 gloo ranks, rank 1 slowed by 0.3 s in its data wait each step: the straggler check names rank 1
    (and only it), and rank 0 spends that time waiting in the gradient sync."""
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            *SMALL,
            "parallel.micro_batch=1",
            "only_stage=base",
            "recipe.stages.base.tokens=12288",  # 6 steps
            "recipe.stages.base.batch_tokens=2048",
            "recipe.stages.base.warmup_tokens=0",
            "logging.log_every_steps=2",
            "logging.straggler_every_steps=2",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
        ],
        cwd=ROOT,
        env={"KILN_FAULT_SLOW_RANK": "1:0.3"},
    )
    # The first window holds the stage's first step (allocation, first-iteration set-up on every rank), so
    # only the later checks (steps 4 and 6) must name rank 1; no check names rank 0.
    warnings = [line for line in proc.stderr.splitlines() if "straggler:" in line]
    assert all("straggler: rank(s) 1 slower than 1.50 x median" in w for w in warnings), warnings
    assert sum(" s4] " in w or " s6] " in w for w in warnings) == 2, proc.stderr[-3000:]
    rows = intervals(read_metrics(run_dir))
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows[1:]:
        assert r["straggler/slowest_rank"] == 1 and r["straggler/ratio"] > 1.5
        # Rank 0's own metrics: no delay in its data wait, the slow rank's 0.3 s in its gradient sync.
        assert r["time/data_wait"] < 0.15
        assert 0.25 < r["time/grad_sync"] < r["time/forward_backward"]
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
        assert r["eta/recipe_s"] == r["eta/stage_s"]  # only_stage: no later stage to wait for


@pytest.mark.slow  # a MoE run (2 gloo ranks, 4 steps)
def test_moe_run_logs_expert_load_per_layer_and_the_report_draws_it(tmp_path, data_cache):
    """Mixtral-style tiny MoE (8 experts, top-2): every logging record holds each layer's expert load over
    the window (models.moe.expert_load_stats, summed over the data-parallel ranks), and the report draws it."""
    from PIL import Image

    run_dir = tmp_path / "run"
    run_train(
        [
            *SMALL,
            "model=mixtral_tiny",
            "parallel.micro_batch=1",
            "only_stage=base",
            "recipe.stages.base.tokens=8192",  # 4 steps
            "recipe.stages.base.batch_tokens=2048",
            "recipe.stages.base.warmup_tokens=0",
            "logging.log_every_steps=2",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
        ],
        cwd=ROOT,
    )
    rows = intervals(read_metrics(run_dir))
    assert [r["step"] for r in rows] == [2, 4]
    experts = 8
    for r in rows:
        layers = sorted({k.split("/")[1] for k in r if k.startswith("moe/layer")})
        assert layers == ["layer0", "layer1"]
        for layer in layers:
            low, high, entropy = (r[f"moe/{layer}/{k}"] for k in ("min", "max", "entropy"))
            # Shares x E average to 1 over the experts: the least loaded is <= 1 <= the most loaded.
            assert 0 <= low <= 1 <= high <= experts and 0 < entropy <= 1
        assert r["moe/max"] == max(r["moe/layer0/max"], r["moe/layer1/max"])
    png = run_dir / "report" / "expert_load.png"
    assert Image.open(png).size == (800, 450) and png.stat().st_size > 10_000


@pytest.mark.slow  # a run
def test_inside_slurm_a_signal_lead_shorter_than_step_plus_checkpoint_is_named(tmp_path, data_cache):
    """The first checkpoint of a job measures one step + one checkpoint write against
    cluster.slurm.signal_lead_s; too short a lead is named in a warning (1 s here: a step and a save take
    more on this machine), the default 60 s of cluster=local is not."""
    args = [*SMALL, "parallel=single", "only_stage=base", "recipe.stages.base.tokens=4096",
            "recipe.stages.base.batch_tokens=2048", "recipe.stages.base.warmup_tokens=0",
            f"data.cache_dir={data_cache}"]  # fmt: skip
    short = run_train(
        [
            *args,
            f"run_dir={tmp_path}/a",
            "cluster.slurm.signal_lead_s=1",
            "model.num_layers=8",
            "model.hidden_size=512",
            "model.ffn_hidden_size=1408",
        ],
        cwd=ROOT,
        env={"SLURM_JOB_ID": "77"},
    )
    (line,) = [ln for ln in short.stderr.splitlines() if "signal_lead_s=1:" in ln]
    step, save = (float(x) for x in re.findall(r"\(([\d.]+) s\)", line))
    assert step > 0 and save > 0 and step + save > 0.9  # > 1 s before rounding to 0.1 s
    assert re.search(r"last checkpoint: set it to >= \d+$", line)
    ok = run_train([*args, f"run_dir={tmp_path}/b"], cwd=ROOT, env={"SLURM_JOB_ID": "78"})
    assert "signal_lead_s" not in ok.stderr
