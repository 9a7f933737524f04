"""The end-of-run report: per stage tokens, losses, validation loss per source, throughput, checkpoints,
and a greedy sample from the final model."""

from __future__ import annotations

import torch

from models.gpt import build_model
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
    ).to(run.device)
    checkpoint.load(last.checkpoint, model=model)
    model.eval()
    ids = tokenizer.tokenize(cfg.sample_prompt)
    prompt_len = len(ids)
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
    lines += ["", f"Greedy sample (prompt {cfg.sample_prompt!r}):", "```", sample, "```"]
    return "\n".join(lines)
