"""Each family's tiny size learns: the loss falls over a few dozen AdamW steps on real text (the Python standard
library's own source, as bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.gpt import build_model
from models.registry import FAMILIES, resolve_arch

STEPS, BATCH, SEQ = 30, 4, 64


def _text() -> torch.Tensor:
    data = b"".join(p.read_bytes() for p in sorted(Path(json.__file__).parent.glob("*.py")))
    return torch.tensor(list(data), dtype=torch.long)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_decreases_on_real_text(family, megatron_world1):
    torch.manual_seed(0)
    kv = 4 if family == "deepseek_v2" else 2  # MLA: one key/value per head
    arch = resolve_arch(
        family,
        "tiny",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=kv,
        ffn_hidden_size=128,
    )
    model = build_model(arch, vocab_size=256, max_seq_length=SEQ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = _text()
    pos = torch.arange(SEQ).expand(BATCH, -1)
    losses = []
    for step in range(STEPS):
        starts = torch.randint(
            0, len(text) - SEQ - 1, (BATCH,), generator=torch.Generator().manual_seed(step)
        )
        chunk = torch.stack([text[s : s + SEQ + 1] for s in starts.tolist()])
        loss = model(chunk[:, :-1], pos, None, labels=chunk[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 4.5  # about ln(256) = 5.5 at random init
    assert last < first - 1.0, losses
