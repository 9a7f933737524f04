"""Evaluations beyond held-out loss, for the long-context stage (issue 6):

- loss by token position, in buckets (does the model use context beyond the base length?);
- a synthetic passkey-retrieval probe (Mohtashami & Jaggi 2023, "Landmark Attention", Sec. 4.2): a random
  number hidden at a chosen depth of filler text, asked for at the end; scored teacher-forced, so a small
  model's partial knowledge shows as a key-token loss and an exact-match accuracy.

Both run the bare megatron model (no pipeline schedule) on every rank of a tensor-parallel group; the
position losses are reduced over the data-parallel axis, the probe is identical on every rank.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


def bucket_edges(seq_length: int, *, buckets: int) -> list[int]:
    """Start positions of `buckets` equal position ranges covering [0, seq_length)."""
    if not 1 <= buckets <= seq_length or seq_length % buckets:
        raise ValueError(f"buckets={buckets} must divide seq_length={seq_length}")
    width = seq_length // buckets
    return [i * width for i in range(buckets)]


@torch.no_grad()
def position_losses(model, micro_batches: list[dict], *, buckets: int, group=None) -> list[float]:
    """Mean next-token loss per position bucket over `micro_batches` (dicts of tokens, labels, loss_mask,
    position_ids on the model's device), token-weighted and summed over `group` (the data-parallel group)."""
    was_training = model.training
    model.eval()
    seq = micro_batches[0]["tokens"].shape[1]
    bucket_edges(seq, buckets=buckets)  # validates
    sums = torch.zeros(2, buckets, dtype=torch.float64)  # [loss sum, token count] per bucket
    for mb in micro_batches:
        losses = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])  # (batch, seq)
        mask = mb["loss_mask"].float()
        per_pos = torch.stack([(losses.float() * mask).sum(0), mask.sum(0)]).cpu().double()  # (2, seq)
        sums += per_pos.view(2, buckets, seq // buckets).sum(-1)
    if group is not None and dist.is_initialized():
        dist.all_reduce(sums, group=group)
    model.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).tolist()


def beyond_ratio(losses: list[float], *, seq_length: int, base_length: int) -> float:
    """Mean loss of the buckets past `base_length` over the mean of those inside it (1.0: no degradation)."""
    width = seq_length // len(losses)
    inside = [x for i, x in enumerate(losses) if (i + 1) * width <= base_length]
    beyond = [x for i, x in enumerate(losses) if i * width >= base_length]
    if not inside or not beyond:
        raise ValueError(f"base_length={base_length} does not split seq_length={seq_length} into both sides")
    return (sum(beyond) / len(beyond)) / (sum(inside) / len(inside))


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
    teacher-forced) and `passkey/<ctx>/loss` (mean key-token cross-entropy), over depths x trials."""
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for ctx in contexts:
        hits, losses = 0, []
        for depth in depths:
            for _ in range(trials):
                sample = passkey_sample(
                    tokenize, context=ctx, depth=depth, key=rng.randrange(10_000, 100_000)
                )
                tokens = torch.tensor([sample.tokens], device=device)
                positions = torch.arange(ctx, device=device).unsqueeze(0)
                logits = model(tokens, positions, None, runtime_gather_output=True)  # (1, ctx, padded vocab)
                pred = logits[0, sample.key_start - 1 : ctx - 1, :vocab_size].float()  # predicts the key
                target = tokens[0, sample.key_start :]
                hits += int(torch.equal(pred.argmax(-1), target))
                losses.append(F.cross_entropy(pred, target).item())
        out[f"passkey/{ctx}/acc"] = hits / (len(depths) * trials)
        out[f"passkey/{ctx}/loss"] = sum(losses) / len(losses)
    model.train(was_training)
    return out
