"""The end-of-run report: per stage tokens, losses, validation loss per source, throughput, checkpoints,
and a greedy sample from the final model; and `python -m train.report <run_dir>`, which renders the run's
plots (train/plots.py) into `<run_dir>/report/` with a one-page index.md and index.html."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from models.gpt import build_model
from parallel import context
from train import checkpoint
from train.config import TrainConfig


@torch.no_grad()
def greedy_sample(cfg: TrainConfig, last, *, run, tokenizer) -> str:
    """Greedy continuation of `cfg.sample_prompt` by the final checkpoint (all ranks take part)."""
    stage = cfg.recipe.stages[last.stage]
    if cfg.parallel.pp > 1 or cfg.parallel.engine != "megatron":
        # The sample runs the whole model on every rank from a megatron-core checkpoint.
        return f"(no sample: it needs engine=megatron and pp=1; this run has engine={cfg.parallel.engine}, pp={cfg.parallel.pp})"
    model = build_model(
        stage.arch(cfg.model.arch()),
        vocab_size=run.vocab_size,
        max_seq_length=stage.seq_length,
        tp=cfg.parallel.tp,
        sp=False,
        attention_backend=cfg.model.attention_backend,
        # no torch.compile: every prompt length of the sample would compile again
        fusions=dataclasses.replace(cfg.model.fusion.resolve(run.device.type), compile=False),
    ).to(run.device)
    checkpoint.load(last.checkpoint, model=model)
    model.eval()
    ids = tokenizer.tokenize(cfg.sample_prompt)
    prompt_len = len(ids)
    with context.whole_sequences(model):  # under CP too: the whole prompt on every rank
        return _greedy(model, ids, prompt_len, cfg=cfg, stage=stage, run=run, tokenizer=tokenizer)


def _greedy(model, ids: list[int], prompt_len: int, *, cfg, stage, run, tokenizer) -> str:
    for _ in range(cfg.sample_tokens):
        tokens = torch.tensor([ids[-stage.seq_length :]], device=run.device)
        positions = torch.arange(tokens.shape[1], device=run.device).unsqueeze(0)
        logits = model(tokens, positions, None, runtime_gather_output=True)  # (1, seq, padded vocab)
        next_id = int(logits[0, -1, : run.vocab_size].argmax())
        if next_id == tokenizer.eod:
            break
        ids.append(next_id)
    return cfg.sample_prompt + tokenizer.detokenize(ids[prompt_len:])


def format_report(cfg: TrainConfig, results: list, *, sample: str) -> str:
    sources = sorted(cfg.data.sources)
    lines = [
        f"# Kiln run {cfg.run_dir}",
        "",
        "| stage | steps | tokens | train loss first -> last | "
        + " | ".join(f"valid {s} start -> end" for s in sources)
        + " | tokens/s | checkpoint |",
        "|---" * (5 + len(sources)) + "|---|",
    ]
    for r in results:
        valid = [
            f"{r.valid_start.get(s, float('nan')):.3f} -> {r.valid_end.get(s, float('nan')):.3f}"
            + (f" (averaged {r.valid_avg[s]:.3f})" if s in r.valid_avg else "")
            for s in sources
        ]
        first, last = (r.train_loss + [float("nan")] * 2)[:2]
        lines.append(
            f"| {r.stage} | {r.step} | {r.tokens:,} | {first:.3f} -> {last:.3f} | "
            + " | ".join(valid)
            + f" | {r.tokens_per_s:,.0f} | {r.checkpoint} |"
        )
    bad = [f"{r.stage} {r.stability_events}" for r in results if r.stability_events]
    if bad:  # train/stability.py; each one is an {"event": "stability"} record in metrics.jsonl
        lines += ["", f"Bad steps (not applied; metrics.jsonl event=stability): {', '.join(bad)}"]
    lines += (
        long_context_section(results, sources) + passkey_section(results) + anneal_section(results, sources)
    )
    lines += ["", f"Greedy sample (prompt {cfg.sample_prompt!r}):", "```", sample, "```"]
    return "\n".join(lines)


def long_context_section(results: list, sources: list[str]) -> list[str]:
    """Per stage with positions past its base context: held-out loss inside vs beyond the base context at
    the stage's end, and for the model it started from at the new context with its old RoPE (unscaled)."""
    rows = []
    for r in results:
        for s in sources:
            if f"context/ratio/{s}" not in r.evals:
                continue

            def cells(prefix, s=s, r=r):
                keys = [f"{prefix}/{k}/{s}" for k in ("inside", "beyond", "ratio")]
                return " | ".join(f"{r.evals[k]:.3f}" if k in r.evals else "-" for k in keys)

            rows.append(f"| {r.stage} | {s} | {cells('context')} | {cells('unscaled')} |")
    if not rows:
        return []
    return [
        "",
        "## Long context: held-out loss inside vs beyond the base context",
        "",
        "| stage | source | inside | beyond | beyond / inside | unscaled inside | unscaled beyond | "
        "unscaled beyond / inside |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Unscaled: the model the stage started from, evaluated at the stage's context with its old RoPE.",
        "",
        "![validation loss by position](report/position_loss.png)",
    ]


def passkey_section(results: list) -> list[str]:
    """Passkey-retrieval accuracy (teacher-forced exact match of the key) and key loss per stage and context,
    with the accuracy per depth."""
    rows = []
    for r in results:
        contexts = sorted({int(k.split("/")[1]) for k in r.evals if k.startswith("passkey/")})
        for c in contexts:
            depths = sorted(
                (k.split("/")[2][6:], v) for k, v in r.evals.items() if k.startswith(f"passkey/{c}/depth_")
            )
            by_depth = ", ".join(f"{d}: {v:.2f}" for d, v in sorted(depths, key=lambda x: float(x[0])))
            rows.append(
                f"| {r.stage} | {c} | {r.evals[f'passkey/{c}/acc']:.2f} | "
                f"{r.evals[f'passkey/{c}/loss']:.3f} | {by_depth} |"
            )
    if not rows:
        return []
    return [
        "",
        "## Passkey retrieval",
        "",
        "| stage | context | accuracy | key loss | accuracy by depth |",
        "|---|---|---|---|---|",
        *rows,
    ]


def anneal_section(results: list, sources: list[str]) -> list[str]:
    """Per stage that decays to LR 0: the LR after its last step, and its held-out loss per source (last
    checkpoint, and the average of its last checkpoints when it averages) next to the first stage's end."""
    first = results[0] if results else None
    lines = []
    for r in results[1:]:
        if "lr_final" not in r.evals or r.evals["lr_final"] > 0:
            continue
        for s in sources:
            if s not in r.valid_end:
                continue
            avg = f"{r.valid_avg[s]:.3f}" if s in r.valid_avg else "-"
            lines.append(
                f"| {r.stage} | {r.evals['lr_final']:.3g} | {s} | {first.valid_end.get(s, float('nan')):.3f} | "
                f"{r.valid_end[s]:.3f} | {avg} |"
            )
    if not lines:
        return []
    return [
        "",
        f"## Annealing: held-out loss vs the end of {first.stage}",
        "",
        f"| stage | LR at end | source | end of {first.stage} | last checkpoint | averaged checkpoints |",
        "|---|---|---|---|---|---|",
        *lines,
    ]


# ------------------------------------------------------------------------- `python -m train.report <run>`
PLOT_TITLES = {
    "loss": "Loss across stages (train, per source, validation; dashed lines: stage boundaries)",
    "lr": "Learning-rate schedule",
    "throughput": "Throughput (tokens/s) and MFU",
    "step_time": "Step time breakdown",
    "position_loss": "Validation loss by position in the context",
    "expert_load": "MoE expert load",
    "data_mix": "Data mix: planned vs realized",
    "planner": "Planner prediction vs measured",
}


def stage_summary(records: list[dict]) -> list[dict]:
    """Per stage: steps, tokens, first/last train loss, final validation losses, median throughput, MFU
    and peak memory over its logging intervals."""
    import statistics

    from train.plots import stage_order

    out = []
    for stage in stage_order(records):
        rows = [r for r in records if r["stage"] == stage]
        train = [r for r in rows if "loss" in r]

        def med(key, rows=rows):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            return statistics.median(vals) if vals else None

        valid = [r for r in rows if any(k.startswith("valid/") for k in r)]
        out.append(
            {
                "stage": stage,
                "steps": max((r["step"] for r in rows), default=0),
                "tokens": max((r.get("tokens", 0) for r in rows), default=0),
                "loss": (train[0]["loss"], train[-1]["loss"]) if train else None,
                "valid": {k[6:]: v for k, v in valid[-1].items() if k.startswith("valid/")} if valid else {},
                "tokens_per_s": med("tokens_per_s"),
                "tflops_per_gpu": med("tflops_per_gpu"),
                "mfu": med("mfu"),
                "memory_gb": max(
                    (r[k] for r in rows for k in ("mem/peak_allocated_gb", "mem/rss_gb") if k in r),
                    default=None,
                ),
            }
        )
    return out


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_run_report(run_dir: str) -> str:
    """Render every plot the run's metrics allow into `<run_dir>/report/` with a one-page index.md and
    index.html linking them. Returns the index.md path."""
    import html

    from train.plots import read_records, render_all

    out_dir = os.path.join(run_dir, "report")
    drawn = render_all(run_dir, out_dir)
    records = read_records(run_dir)
    md = [
        f"# Kiln run report: {os.path.abspath(run_dir)}",
        "",
        "| stage | steps | tokens | train loss first -> last | final validation | tokens/s | TFLOP/s/GPU | MFU | peak mem GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stage_summary(records):
        loss = f"{s['loss'][0]:.3f} -> {s['loss'][1]:.3f}" if s["loss"] else "-"
        valid = ", ".join(f"{k} {v:.3f}" for k, v in s["valid"].items()) or "-"
        md.append(
            f"| {s['stage']} | {s['steps']} | {s['tokens']:,} | {loss} | {valid} | "
            f"{_cell(s['tokens_per_s'], ',.0f')} | {_cell(s['tflops_per_gpu'], '.3g')} | "
            f"{_cell(s['mfu'], '.1%')} | {_cell(s['memory_gb'], '.2f')} |"
        )
    md.append("")
    for name, path in drawn.items():
        md += [f"## {PLOT_TITLES[name]}", "", f"![{name}]({os.path.basename(path)})", ""]
    missing = [PLOT_TITLES[n] for n in PLOT_TITLES if n not in drawn]
    if missing:
        md += ["Not recorded in this run: " + "; ".join(missing) + ".", ""]
    index_md = os.path.join(out_dir, "index.md")
    with open(index_md, "w") as f:
        f.write("\n".join(md))
    body = [
        f"<h1>{html.escape(md[0][2:])}</h1>",
        _html_table(md[2:4] + md[4 : 4 + len(stage_summary(records))]),
    ]
    for name, path in drawn.items():
        body.append(f"<h2>{html.escape(PLOT_TITLES[name])}</h2>")
        body.append(f'<img src="{os.path.basename(path)}" width="800" height="450" alt="{name}">')
    if missing:
        body.append(f"<p>Not recorded in this run: {html.escape('; '.join(missing))}.</p>")
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(
            "<!doctype html><html><head><meta charset='utf-8'><title>Kiln run report</title>"
            "<style>body{font-family:sans-serif;max-width:860px;margin:auto}"
            "td,th{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}</style></head><body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )
    return index_md


def _html_table(rows: list[str]) -> str:
    import html

    cells = [
        [html.escape(c.strip()) for c in row.strip("|").split("|")]
        for row in rows
        if not row.startswith("|---")
    ]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__)
    parser.add_argument("run_dir", help="a run directory (runs/<experiment>/<name>) holding metrics.jsonl")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, "metrics.jsonl")):
        print(f"kiln: {args.run_dir} has no metrics.jsonl; give a run directory", file=sys.stderr)
        return 2
    print(write_run_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
