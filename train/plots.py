"""Pictures of a run, drawn from its `metrics.jsonl` (the source of truth) with matplotlib.

Each `plot_*` function takes the run's records and an output path, draws one 800x450 PNG and returns
True, or returns False without writing when the run recorded nothing it could show (no MoE layers, no
per-position evaluation, no planner prediction). The x-axis is the recipe-wide `global_step`, with the
stage boundaries drawn as vertical lines.

A planner prediction is read from `<run_dir>/plan.json`: `{"predicted": {<metric key>: value}}`, keyed by
the metric names of train/metrics.py (e.g. "time/step", "mem/peak_allocated_gb", "tokens_per_s", "mfu");
the run writes it at its start from `logging.predicted` (`write_prediction`), which the planner puts in the
config it generates (`parallel.plan.emit.prediction`).
"""

from __future__ import annotations

import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZE_IN, DPI = (8.0, 4.5), 100  # 800 x 450 pixels


def read_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_order(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["stage"] for r in records))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["global_step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(title: str):
    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _boundaries(ax, records: list[dict]) -> None:
    """Dashed lines where each stage starts (its first global step), labelled with the stage name."""
    for name in stage_order(records):
        start = min(r["global_step"] for r in records if r["stage"] == name)
        ax.axvline(start, color="grey", ls="--", lw=0.8)
        ax.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8)


def _save(fig, path: str) -> bool:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": it would change the pixel size
    plt.close(fig)
    return True


def plot_loss(records: list[dict], path: str) -> bool:
    x, y = _series(records, "loss")
    if not x:
        return False
    fig, ax = _figure("Loss across stages")
    ax.plot(x, y, label="train", lw=1.2)
    for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
        ax.plot(*_series(records, key), lw=0.8, alpha=0.7, label=f"train {key[5:]}")
    for key in sorted({k for r in records for k in r if k.startswith("valid/")}):
        ax.plot(*_series(records, key), "o-", ms=3, lw=0.8, label=key)
    for key in sorted({k for r in records for k in r if k.startswith("valid_avg/")}):  # checkpoint average
        ax.plot(*_series(records, key), "*", ms=8, label=key)
    _boundaries(ax, records)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_lr(records: list[dict], path: str) -> bool:
    x, y = _series(records, "lr")
    if not x:
        return False
    fig, ax = _figure("Learning rate")
    ax.plot(x, y)
    _boundaries(ax, records)
    ax.set_xlabel("global step")
    ax.set_ylabel("learning rate")
    return _save(fig, path)


def plot_throughput(records: list[dict], path: str) -> bool:
    x, y = _series(records, "tokens_per_s")
    if not x:
        return False
    fig, ax = _figure("Throughput and MFU")
    ax.plot(x, y, color="C0", label="tokens/s (global)")
    ax.set_xlabel("global step")
    ax.set_ylabel("tokens/s", color="C0")
    right = ax.twinx()
    key, label = ("mfu", "MFU") if any("mfu" in r for r in records) else ("tflops_per_gpu", "TFLOP/s per GPU")
    right.plot(*_series(records, key), color="C1", label=label)
    right.set_ylabel(label, color="C1")
    _boundaries(ax, records)
    return _save(fig, path)


def plot_step_time(records: list[dict], path: str) -> bool:
    keys = ["time/data_wait", "time/forward_backward", "time/optimizer"]
    rows = [r for r in records if all(k in r for k in keys)]
    if not rows:
        return False
    fig, ax = _figure("Step time breakdown (seconds per step)")
    x = [r["global_step"] for r in rows]
    # grad_sync is measured inside forward_backward: show it as its own band, the rest as compute.
    sync = [r.get("time/grad_sync", 0.0) for r in rows]
    bands = {
        "data wait": [r["time/data_wait"] for r in rows],
        "forward-backward (compute)": [r["time/forward_backward"] - s for r, s in zip(rows, sync)],
        "gradient sync wait": sync,
        "optimizer": [r["time/optimizer"] for r in rows],
    }
    ax.stackplot(x, *bands.values(), labels=list(bands))
    ax.plot(x, [r["time/step"] for r in rows], "k-", lw=0.8, label="step (wall)")
    _boundaries(ax, rows)
    ax.set_xlabel("global step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_position_loss(records: list[dict], path: str) -> bool:
    """Validation loss by position in the context (one line per stage and source), from
    `valid_by_position/<source>` lists (loss per equal-width position bucket) of each stage's final
    evaluation; dashed, `unscaled_by_position/<source>` (the model a long-context stage starts from, at the
    new context with its old RoPE); a vertical line at the shortest context of the run (the base context)."""
    rows = [r for r in records if any(k.startswith("valid_by_position/") for k in r)]
    if not rows:
        return False
    last = {r["stage"]: r for r in rows}  # the stage's final evaluation
    unscaled = {r["stage"]: r for r in records if any(k.startswith("unscaled_by_position/") for k in r)}
    seq_length = {r["stage"]: r["seq_length"] for r in records if "seq_length" in r}
    fig, ax = _figure("Validation loss by position in the context")
    for stage, rec in [*last.items(), *unscaled.items()]:
        prefix = "unscaled_by_position/" if rec is unscaled.get(stage) else "valid_by_position/"
        for key in sorted(k for k in rec if k.startswith(prefix)):
            buckets = [float("nan") if v is None else v for v in rec[key]]
            seq = seq_length.get(stage, len(buckets))
            xs = [(i + 0.5) * seq / len(buckets) for i in range(len(buckets))]
            label = f"{stage} {key.split('/', 1)[1]}"
            if prefix.startswith("unscaled"):
                ax.plot(xs, buckets, "x--", ms=4, label=f"{label} (start, RoPE unscaled)")
            else:
                ax.plot(xs, buckets, "o-", ms=3, label=label)
    if len(set(seq_length.values())) > 1:
        ax.axvline(min(seq_length.values()), color="gray", ls=":", lw=1, label="base context")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_expert_load(records: list[dict], path: str) -> bool:
    """Heatmap of every `moe/...` metric over the logged steps (rows: metric, columns: step)."""
    keys = sorted({k for r in records for k in r if k.startswith("moe/")})
    rows = [r for r in records if any(k in r for k in keys)]
    if not keys or not rows:
        return False
    fig, ax = _figure("MoE expert load")
    grid = [[r.get(k, float("nan")) for r in rows] for k in keys]
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(keys)), [k[4:] for k in keys], fontsize=6)
    ticks = range(0, len(rows), max(1, len(rows) // 8))
    ax.set_xticks(list(ticks), [str(rows[i]["global_step"]) for i in ticks])
    ax.set_xlabel("global step")
    ax.grid(False)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def data_mix(records: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per stage and source: (planned weight, realized fraction of samples) from the stage-start record's
    `planned/<source>` weights and the last logged `data/<source>/fraction`."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for stage in stage_order(records):
        rows = [r for r in records if r["stage"] == stage]
        planned = {k[8:]: v for r in rows for k, v in r.items() if k.startswith("planned/")}
        done = [r for r in rows if any(k.startswith("data/") for k in r)]
        if not planned or not done:
            continue
        total = sum(planned.values())
        out[stage] = {s: (w / total, done[-1].get(f"data/{s}/fraction", 0.0)) for s, w in planned.items()}
    return out


def plot_data_mix(records: list[dict], path: str) -> bool:
    mix = data_mix(records)
    if not mix:
        return False
    fig, ax = _figure("Data mix: planned vs realized (fraction of samples)")
    labels = [(stage, src) for stage, sources in mix.items() for src in sources]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [mix[s][src][0] for s, src in labels], width=0.4, label="planned")
    ax.bar([x + 0.2 for x in xs], [mix[s][src][1] for s, src in labels], width=0.4, label="realized")
    ax.set_xticks(list(xs), [f"{s}\n{src}" for s, src in labels], fontsize=7)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_prediction(run_dir: str, predicted: dict[str, float]) -> str:
    """Record what the planner predicted for this run (`logging.predicted`, which `python -m parallel.plan`
    writes into the generated config) as `<run_dir>/plan.json`, which the report compares with what the run
    measured."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "plan.json")
    with open(path, "w") as f:
        json.dump({"predicted": dict(predicted)}, f, indent=1)
    return path


def planner_vs_measured(records: list[dict], run_dir: str) -> dict[str, tuple[float, float]]:
    """(predicted, measured median over the run) for each metric `<run_dir>/plan.json` predicts."""
    path = os.path.join(run_dir, "plan.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        predicted = json.load(f).get("predicted", {})
    out = {}
    for key, value in predicted.items():
        measured = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if measured:
            out[key] = (float(value), statistics.median(measured))
    return out


def plot_planner(records: list[dict], path: str, *, run_dir: str) -> bool:
    pairs = planner_vs_measured(records, run_dir)
    if not pairs:
        return False
    fig, ax = _figure("Planner prediction vs measured (measured / predicted)")
    keys = list(pairs)
    ratios = [m / p if p else float("nan") for p, m in pairs.values()]
    ax.bar(range(len(keys)), ratios, color=["C2" if 0.8 <= r <= 1.25 else "C3" for r in ratios])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)), keys, fontsize=7)
    for i, (p, m) in enumerate(pairs.values()):
        ax.annotate(f"{m:.3g} / {p:.3g}", (i, ratios[i]), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("measured / predicted")
    return _save(fig, path)


PLOTS = {
    "loss": plot_loss,
    "lr": plot_lr,
    "throughput": plot_throughput,
    "step_time": plot_step_time,
    "position_loss": plot_position_loss,
    "expert_load": plot_expert_load,
    "data_mix": plot_data_mix,
}


def render_all(run_dir: str, out_dir: str) -> dict[str, str]:
    """Every plot the run's records allow, as {name: png path}."""
    records = read_records(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    drawn = {}
    for name, fn in PLOTS.items():
        path = os.path.join(out_dir, f"{name}.png")
        if fn(records, path):
            drawn[name] = path
    path = os.path.join(out_dir, "planner.png")
    if plot_planner(records, path, run_dir=run_dir):
        drawn["planner"] = path
    return drawn
