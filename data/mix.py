"""The mix plan: per stage, a token target split over sources by weight, with each source's repetition
(epochs) checked against its `max_repetition` before any training reads it.

tokens_s = target x w_s / sum(w); epochs_s = tokens_s / available_s. A source asked for more than
`max_repetition` epochs makes the mix impossible: refused with the numbers and the largest target that
fits. Repetition up to ~4 epochs costs little (Muennighoff et al. 2023, "Scaling Data-Constrained
Language Models", section 5).
"""

from __future__ import annotations

import json
import logging
import os

from train.errors import ConfigError

log = logging.getLogger(__name__)

PLAN = "mix_plan.json"


def mix_plan(
    stages: dict[str, dict],
    *,
    available: dict[str, int],
    max_repetition: dict[str, float],
) -> dict:
    """stages: {stage: {"tokens": target, "mix": {source: weight}}}; available: tokens per source.
    Returns {stage: {"tokens": target, "sources": {source: {weight, tokens, available, epochs,
    max_repetition}}}}; raises ConfigError for an unknown source or a source repeated past its limit."""
    plan: dict[str, dict] = {}
    for stage, spec in stages.items():
        target = int(spec["tokens"])
        mix = {k: float(v) for k, v in spec["mix"].items()}
        if target <= 0 or not mix or any(w <= 0 for w in mix.values()):
            raise ConfigError(f"stages.{stage}", spec, "needs tokens > 0 and a weight > 0 per source")
        total = sum(mix.values())
        rows = {}
        for src, w in sorted(mix.items()):
            if src not in available:
                raise ConfigError(
                    f"stages.{stage}.mix.{src}", w, f"no such source; sources are {sorted(available)}"
                )
            tokens = target * w / total
            have = available[src]
            epochs = tokens / have if have else float("inf")
            limit = max_repetition[src]
            if epochs > limit:
                fits = int(have * limit * total / w)
                raise ConfigError(
                    f"stages.{stage}.mix.{src}",
                    w,
                    f"needs {tokens:,.0f} tokens of {src!r} ({epochs:.2f} epochs of its {have:,} tokens) but "
                    f"max_repetition is {limit:g}; lower its weight, raise data.sources.{src}.max_repetition, "
                    f"or cut the stage to at most {fits:,} tokens",
                )
            rows[src] = {
                "weight": w / total,
                "tokens": round(tokens),
                "available": have,
                "epochs": round(epochs, 4),
                "max_repetition": limit,
            }
        plan[stage] = {"tokens": target, "sources": rows}
    return plan


def format_plan(plan: dict) -> str:
    lines = [
        f"{'stage':<14}{'source':<14}{'weight':>8}{'tokens':>16}{'available':>16}{'epochs':>8}{'max':>6}"
    ]
    for stage, p in plan.items():
        for src, r in p["sources"].items():
            lines.append(
                f"{stage:<14}{src:<14}{r['weight']:>8.3f}{r['tokens']:>16,}{r['available']:>16,}"
                f"{r['epochs']:>8.2f}{r['max_repetition']:>6g}"
            )
    return "\n".join(lines)


def write_plan(plan: dict, directory: str) -> str:
    path = os.path.join(directory, PLAN)
    with open(path, "w") as f:
        json.dump(plan, f, indent=2)
    log.info("mix plan (%s):\n%s", path, format_plan(plan))
    return path
