"""Evaluations beyond held-out loss, for the long-context stage (issue 6):

- loss by token position (the engine's per-bucket validation loss, `train/metrics.py`), split at the base
  context: the mean loss of the buckets past it against those inside it, for the stage's model and, at the
  start of a stage that extends the context, for the model it starts from evaluated at the new context with
  its old RoPE (the "unscaled" baseline: what the context extension is for);
- a synthetic passkey-retrieval probe (Mohtashami & Jaggi 2023, "Landmark Attention", Sec. 4.2): a random
  number hidden at a chosen depth of filler text, asked for at the end; scored teacher-forced, so a small
  model's partial knowledge shows as a key-token loss and an exact-match accuracy.

The probe runs the bare megatron model (no pipeline schedule) on every rank of a tensor-parallel group, the
same samples on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


# ------------------------------------------------------------------------------- loss by position
def base_context(stages: dict, name: str) -> int:
    """The shortest context along stage `name`'s init_from chain inside the recipe (itself included): the
    context the model was pre-trained at before any extension."""
    seq, seen, parent = stages[name].seq_length, {name}, stages[name].init_from
    while parent in stages and parent not in seen:
        seen.add(parent)
        seq, parent = min(seq, stages[parent].seq_length), stages[parent].init_from
    return seq


def unscaled_arch(stages: dict, name: str, model):
    """The architecture stage `name` starts from (its init_from stage's, or the model's own for a path) when
    the stage extends the context past that stage's and changes RoPE; None otherwise. `model`: the Arch."""
    stage = stages[name]
    if stage.init_from is None or stage.arch(model).mla is not None:
        return None
    parent = stages.get(stage.init_from)
    before = parent.arch(model) if parent is not None else model
    longer = parent is None or stage.seq_length > parent.seq_length
    after = stage.arch(model)
    changed = (before.rope, before.rope_theta) != (after.rope, after.rope_theta)
    return before if longer and changed else None


@contextlib.contextmanager
def rope_as(modules, arch):
    """Run `modules` (the model chunks) with the RoPE of `arch` (theta and scaling); no weight changes, so
    the model is the same network evaluated with other position angles. Restored on exit."""
    from models.rope import KilnRotaryEmbedding

    saved = []
    for m in modules:
        old = getattr(m, "rotary_pos_emb", None)
        if not isinstance(old, KilnRotaryEmbedding):
            continue
        new = KilnRotaryEmbedding(
            dim=old.dim, theta=arch.rope_theta, scaling=arch.rope, cp_group=old.cp_group
        )
        new.inv_freq = new.inv_freq.to(old.inv_freq.device)
        saved.append((m, old))
        m.rotary_pos_emb = new
    try:
        yield
    finally:
        for m, old in saved:
            m.rotary_pos_emb = old


def split_means(losses: list, *, seq_length: int, base_length: int) -> tuple[float, float] | None:
    """(mean loss of the buckets inside `base_length`, mean of those past it), over equal-width buckets of
    `seq_length`; buckets without tokens (None) are left out. None when `base_length` does not fall on a
    bucket edge with buckets on both sides."""
    width = seq_length // len(losses)
    inside = [x for i, x in enumerate(losses) if (i + 1) * width <= base_length and x is not None]
    beyond = [x for i, x in enumerate(losses) if i * width >= base_length and x is not None]
    if base_length % width or not inside or not beyond:
        return None
    return sum(inside) / len(inside), sum(beyond) / len(beyond)


def context_metrics(positions: dict, *, seq_length: int, base_length: int, prefix: str) -> dict[str, float]:
    """`<prefix>/inside/<source>`, `<prefix>/beyond/<source>` and `<prefix>/ratio/<source>` (beyond / inside;
    1.0: positions past the base context are as well predicted as those inside it) from per-bucket losses."""
    out = {}
    for source, losses in positions.items():
        split = split_means(losses, seq_length=seq_length, base_length=base_length)
        if split is not None:
            inside, beyond = split
            out |= {
                f"{prefix}/inside/{source}": inside,
                f"{prefix}/beyond/{source}": beyond,
                f"{prefix}/ratio/{source}": beyond / inside,
            }
    return out


# --------------------------------------------------------------------------------------- passkey
@dataclass
class Passkey:
    tokens: list[int]
    """The whole sample, `context` tokens long, ending with the key's tokens."""
    key_start: int
    """Index in `tokens` of the first token of the answer's key."""
    needle_at: int
    """Index in `tokens` where the needle sentence starts."""


def passkey_sample(tokenize, *, context: int, depth: float, key: int) -> Passkey:
    """Filler with the needle at `depth` (0 = start, 1 = just before the question), the question and the
    key as the answer; exactly `context` tokens. The key is tokenized once and used in both places."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    key_ids = tokenize(str(key))
    needle = []
    for part in NEEDLE.split("{key}"):
        needle += tokenize(part) + key_ids
    needle = needle[: -len(key_ids)]
    question = tokenize(QUESTION)
    room = context - len(needle) - len(question) - len(key_ids)
    filler_unit = tokenize(FILLER)
    if room < 0:
        raise ValueError(f"context={context} is too short for the passkey prompt ({context - room} tokens)")
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    cut = int(round(depth * room))
    tokens = filler[:cut] + needle + filler[cut:] + question + key_ids
    assert len(tokens) == context
    return Passkey(tokens=tokens, key_start=context - len(key_ids), needle_at=cut)


@torch.no_grad()
def passkey_probe(
    model,
    tokenize,
    *,
    contexts: list[int],
    depths: list[float],
    trials: int,
    vocab_size: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """Per context length: `passkey/<ctx>/acc` (fraction of samples whose every key token is the argmax,
    teacher-forced) and `passkey/<ctx>/loss` (mean key-token cross-entropy), over depths x trials; and
    `passkey/<ctx>/depth_<depth>/acc` per depth."""
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for ctx in contexts:
        hits, losses = 0, []
        for depth in depths:
            depth_hits = 0
            for _ in range(trials):
                sample = passkey_sample(
                    tokenize, context=ctx, depth=depth, key=rng.randrange(10_000, 100_000)
                )
                tokens = torch.tensor([sample.tokens], device=device)
                positions = torch.arange(ctx, device=device).unsqueeze(0)
                logits = model(tokens, positions, None, runtime_gather_output=True)  # (1, ctx, padded vocab)
                pred = logits[0, sample.key_start - 1 : ctx - 1, :vocab_size].float()  # predicts the key
                target = tokens[0, sample.key_start :]
                depth_hits += int(torch.equal(pred.argmax(-1), target))
                losses.append(F.cross_entropy(pred, target).item())
            out[f"passkey/{ctx}/depth_{depth:g}/acc"] = depth_hits / trials
            hits += depth_hits
        out[f"passkey/{ctx}/acc"] = hits / (len(depths) * trials)
        out[f"passkey/{ctx}/loss"] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def stage_passkey(engine, stage, *, layout, tokenizer_path: str, vocab_size: int, device) -> dict[str, float]:
    """The passkey probe of `stage` (its passkey_contexts, depths and trials) on the engine's model; nothing
    when the stage asks for none, or (with a log line) when the model is not whole on each tensor-parallel
    group (pipeline parallelism) or not a plain megatron module (DeepSpeed)."""
    if not stage.passkey_contexts:
        return {}
    if layout.pp > 1 or getattr(engine, "name", "") != "megatron":
        log.info("passkey probe skipped: it runs the bare model, so needs engine=megatron and pp=1")
        return {}
    from data.tokenizer import load_tokenizer
    from parallel import context

    tokenizer = load_tokenizer(tokenizer_path)
    with context.whole_sequences(engine.modules[0]):  # under CP too: whole sequences on every rank
        return passkey_probe(
            engine.modules[0],
            tokenizer.tokenize,
            contexts=list(stage.passkey_contexts),
            depths=list(stage.passkey_depths),
            trials=stage.passkey_trials,
            vocab_size=vocab_size,
            device=device,
        )


def unscaled_baseline(modules, evaluate, *, stages: dict, name: str, model) -> dict:
    """At the start of stage `name`: when it extends the context (`unscaled_arch`), the loss by position of
    the model it starts from at the new context with that model's own RoPE, as `unscaled_by_position/<source>`
    lists and `context_metrics` under `unscaled/`. `evaluate(positions)` runs the held-out evaluation,
    filling `positions` with per-bucket losses per source; `model`: the recipe's Arch."""
    before = unscaled_arch(stages, name, model)
    if before is None:
        return {}
    positions: dict = {}
    with rope_as(modules, before):
        evaluate(positions)
    split = context_metrics(
        positions,
        seq_length=stages[name].seq_length,
        base_length=base_context(stages, name),
        prefix="unscaled",
    )
    return {f"unscaled_by_position/{k}": v for k, v in positions.items()} | split
