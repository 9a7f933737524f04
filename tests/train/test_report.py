"""`python -m train.report`: every plot from a run's records, including those a CPU run does not record
(MoE expert load, planner predictions), and the numbers its tables are made of."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from train.plots import data_mix, planner_vs_measured
from train.report import main, stage_summary, write_run_report


def synthetic_run(run_dir) -> list[dict]:
    """Two stages of 10 steps as train/loop.py writes them, with MoE metrics and per-position losses."""
    records = []
    for s, (stage, seq) in enumerate((("base", 256), ("long_context", 1024))):
        offset = 10 * s
        records.append(
            {
                "stage": stage,
                "step": 0,
                "event": "stage_start",
                "seq_length": seq,
                "planned/code": 0.7,
                "planned/docs": 0.3,
                "global_step": offset,
            }  # fmt: skip
        )
        records.append({"stage": stage, "step": 0, "valid/code": 7.0 - s, "global_step": offset})
        for step in range(1, 11):
            code = 7 * step
            records.append(
                {
                    "stage": stage,
                    "step": step,
                    "tokens": 2048 * step,
                    "global_step": offset + step,
                    "loss": 7.0 - 0.1 * (offset + step),
                    "loss/code": 6.9 - 0.1 * (offset + step),
                    "lr": 1e-3 * (1 - step / 10),
                    "tokens_per_s": 1000.0 + step,
                    "mfu": 0.3 + 0.01 * s,
                    "tflops_per_gpu": 0.1,
                    "time/step": 2.0 + s,
                    "time/data_wait": 0.1,
                    "time/forward_backward": 1.5 + s,
                    "time/grad_sync": 0.2,
                    "time/optimizer": 0.3,
                    "mem/peak_allocated_gb": 40.0 + step,
                    "data/code/samples": code,
                    "data/docs/samples": 10 * step - code,
                    "data/code/fraction": 0.7,
                    "data/docs/fraction": 0.3,
                    **{f"moe/layer{i}/max_load": 1.0 + 0.1 * i for i in range(4)},
                }  # fmt: skip
            )
        records.append(
            {
                "stage": stage,
                "step": 10,
                "valid/code": 6.0 - s,
                "global_step": offset + 10,
                "valid_by_position/code": [6.5, 6.2, 6.0, None, 5.8, 5.7, 5.6, 5.5],
            }  # fmt: skip
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_report_renders_every_plot_at_800x450(tmp_path):
    run_dir = tmp_path / "run"
    synthetic_run(run_dir)
    (run_dir / "plan.json").write_text(
        json.dumps({"predicted": {"time/step": 2.0, "mem/peak_allocated_gb": 50.0, "mfu": 0.5, "nope": 1}})
    )
    index = write_run_report(str(run_dir))
    names = ["loss", "lr", "throughput", "step_time", "position_loss", "expert_load", "data_mix", "planner"]
    for name in names:
        png = run_dir / "report" / f"{name}.png"
        assert Image.open(png).size == (800, 450), name
        assert png.stat().st_size > 10_000, name
    md = Path(index).read_text()
    assert [line for line in md.splitlines() if line.startswith("![")] == [f"![{n}]({n}.png)" for n in names]
    assert "Not recorded" not in md
    assert "| base | 10 | 20,480 | 6.900 -> 6.000 | code 6.000 | 1,006 | 0.1 | 30.0% | 50.00 |" in md
    html = (run_dir / "report" / "index.html").read_text()
    assert html.count("<img ") == 8 and "<td>long_context</td>" in html


def test_report_numbers(tmp_path):
    records = synthetic_run(tmp_path / "run")
    (tmp_path / "run" / "plan.json").write_text(json.dumps({"predicted": {"time/step": 2.0, "mfu": 0.25}}))
    # Median measured over both stages' intervals: time/step 2.0 (x10) and 3.0 (x10) -> 2.5; MFU 0.3/0.31.
    assert planner_vs_measured(records, str(tmp_path / "run")) == {
        "time/step": (2.0, 2.5),
        "mfu": (0.25, pytest.approx(0.305)),
    }
    assert planner_vs_measured(records, str(tmp_path)) == {}
    assert data_mix(records) == {
        "base": {"code": (pytest.approx(0.7), 0.7), "docs": (pytest.approx(0.3), 0.3)},
        "long_context": {"code": (pytest.approx(0.7), 0.7), "docs": (pytest.approx(0.3), 0.3)},
    }
    base, long_context = stage_summary(records)
    assert base["steps"] == 10 and base["tokens"] == 20480
    assert base["loss"] == (pytest.approx(6.9), pytest.approx(6.0))
    assert base["tokens_per_s"] == 1005.5 and long_context["mfu"] == 0.31
    assert long_context["memory_gb"] == 50.0 and long_context["valid"] == {"code": 5.0}


def test_plots_are_skipped_when_not_recorded(tmp_path):
    run_dir = tmp_path / "run"
    records = [{"stage": "base", "step": 1, "global_step": 1, "loss": 5.0, "lr": 1e-3}]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    md = Path(write_run_report(str(run_dir))).read_text()
    assert sorted(p.name for p in (run_dir / "report").glob("*.png")) == ["loss.png", "lr.png"]
    assert "Not recorded in this run: Throughput (tokens/s) and MFU; Step time breakdown;" in md
    assert "| base | 1 | 0 | 5.000 -> 5.000 | - | - | - | - | - |" in md


def test_cli_names_a_directory_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path} has no metrics.jsonl" in capsys.readouterr().err
    synthetic_run(tmp_path / "run")
    assert main([str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / "report" / "index.md")


def test_planner_candidate_becomes_the_prediction_the_report_compares(tmp_path):
    from parallel.plan.emit import prediction
    from parallel.plan.memory import Layout, Memory
    from parallel.plan.search import Candidate
    from parallel.plan.steptime import StepTime
    from train.plots import write_prediction

    # 8 GPUs, 2.0 s per step of 64 x 4096 tokens; 6e15 model FLOPs per step on 8 x 1e15 peak.
    candidate = Candidate(
        layout=Layout(tp=2, dp=4),
        batch_sequences=64,
        seq_length=4096,
        memory=Memory(
            weights=8 * 2**30, grads=8 * 2**30, optimizer=16 * 2**30, activations=30 * 2**30, margin=2**31
        ),
        time=StepTime(compute=1.5, bubble=0, tp=0.3, ep=0, cp=0, pp=0, dp=0.2, model_flops=6e15, peak=8e15),
    )
    write_prediction(str(tmp_path), prediction(candidate))
    predicted = json.loads((tmp_path / "plan.json").read_text())["predicted"]
    assert predicted == {
        "time/step": 2.0,
        "tokens_per_s": 64 * 4096 / 2.0,
        "tokens_per_s_per_gpu": 64 * 4096 / 2.0 / 8,
        "mfu": 6e15 / (8e15 * 2.0),
        "mem/peak_allocated_gb": 64.0,
    }
    records = [
        {"stage": "base", "step": 1, "global_step": 1, "time/step": 2.5, "mem/peak_allocated_gb": 60.0}
    ]
    assert planner_vs_measured(records, str(tmp_path)) == {
        "time/step": (2.0, 2.5),
        "mem/peak_allocated_gb": (64.0, 60.0),
    }


def test_report_md_sections_for_long_context_passkey_and_anneal():
    from train.loop import StageResult
    from train.report import anneal_section, long_context_section, passkey_section

    base = StageResult("base", 8, 100, True, 1e-3, 1e-4, valid_end={"code": 3.0, "docs": 4.0})
    lc = StageResult(
        "long_context",
        8,
        100,
        True,
        1e-3,
        1e-4,
        valid_end={"code": 2.9, "docs": 3.9},
        evals={
            **{f"context/{k}/docs": v for k, v in (("inside", 2.0), ("beyond", 2.1), ("ratio", 1.05))},
            **{f"unscaled/{k}/docs": v for k, v in (("inside", 2.0), ("beyond", 3.0), ("ratio", 1.5))},
            "passkey/1024/acc": 0.5,
            "passkey/1024/loss": 1.25,
            "passkey/1024/depth_0/acc": 0.0,
            "passkey/1024/depth_0.5/acc": 1.0,
            "lr_final": 1e-4,
        },
    )
    anneal = StageResult(
        "anneal",
        8,
        100,
        True,
        1e-4,
        1e-5,
        valid_end={"code": 2.8, "docs": 3.5},
        valid_avg={"docs": 3.4},
        evals={"lr_final": 0.0},
    )
    results = [base, lc, anneal]
    lines = long_context_section(results, ["code", "docs"])
    assert "| long_context | docs | 2.000 | 2.100 | 1.050 | 2.000 | 3.000 | 1.500 |" in lines
    assert not any(line.startswith("| long_context | code") for line in lines)  # no split for code
    assert "![validation loss by position](report/position_loss.png)" in lines
    assert "| long_context | 1024 | 0.50 | 1.250 | 0: 0.00, 0.5: 1.00 |" in passkey_section(results)
    lines = anneal_section(results, ["code", "docs"])
    assert "| anneal | 0 | docs | 4.000 | 3.500 | 3.400 |" in lines  # long_context ends at 1e-4: not listed
    assert "| anneal | 0 | code | 3.000 | 2.800 | - |" in lines and len(lines) == 7
    assert (
        long_context_section([base], ["docs"]) == passkey_section([base]) == anneal_section([base], []) == []
    )
