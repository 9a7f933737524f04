"""The plain-torch blocks and model features, each against a direct formula."""

from __future__ import annotations

import math

import pytest
import torch

from models.arch import RopeScaling
from models.blocks import CoreAttention, RMSNorm
from models.gpt import build_model, z_loss
from models.registry import resolve_arch
from models.rope import inv_freq, yarn_mscale


class _Cfg:
    kv_channels = 8


def _reference_attention(q, k, v, *, scale, window=None, softcap=None):
    # q: (s, b, h, d); loops over query positions, no masking tricks.
    s = q.shape[0]
    out = torch.zeros(s, q.shape[1], q.shape[2], v.shape[-1])
    for i in range(s):
        lo = 0 if window is None else max(0, i - window + 1)
        scores = torch.einsum("bhd,tbhd->bht", q[i], k[lo : i + 1]) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        out[i] = torch.einsum("bht,tbhd->bhd", scores.softmax(-1), v[lo : i + 1])
    return out.reshape(s, q.shape[1], -1)


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (None, 2.0), (3, 1.5)])
def test_core_attention_window_and_softcap(window, softcap):
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 4, 8) * 2 for _ in range(3))
    attn = CoreAttention(config=_Cfg(), layer_number=1, window=window, softcap=softcap)
    expected = _reference_attention(q, k, v, scale=8**-0.5, window=window, softcap=softcap)
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_core_attention_groups_share_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 1, 4, 8), torch.randn(6, 1, 2, 8), torch.randn(6, 1, 2, 8)
    attn = CoreAttention(config=_Cfg(), layer_number=1)
    full = attn(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(attn(q, k, v), full)


def test_rmsnorm_both_forms():
    x = torch.randn(3, 16)
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    n = RMSNorm(None, 16, eps=1e-6)
    n.weight.data.fill_(2.0)
    torch.testing.assert_close(n(x), 2 * x / rms)
    g = RMSNorm(None, 16, eps=1e-6, zero_centered=True)
    g.weight.data.fill_(0.5)
    torch.testing.assert_close(g(x), 1.5 * x / rms)


def test_rope_kinds_against_formulas():
    base = inv_freq(8, 10_000.0, RopeScaling())
    torch.testing.assert_close(base, torch.tensor([10_000.0 ** (-i / 8) for i in range(0, 8, 2)]))
    torch.testing.assert_close(inv_freq(8, 10_000.0, RopeScaling(kind="linear", factor=4)), base / 4)
    dyn = RopeScaling(kind="dynamic", factor=2.0, original_context=16)
    torch.testing.assert_close(inv_freq(8, 10_000.0, dyn, seq_length=16), base)
    grown = 10_000.0 * (2.0 * 32 / 16 - 1) ** (8 / 6)
    torch.testing.assert_close(inv_freq(8, 10_000.0, dyn, seq_length=32), inv_freq(8, grown, RopeScaling()))
    # Llama 3: the longest wavelengths divided by the factor, the shortest kept.
    l3 = inv_freq(128, 500_000.0, RopeScaling(kind="llama3", factor=8.0, original_context=8192))
    full = inv_freq(128, 500_000.0, RopeScaling())
    assert l3[0] == full[0] and torch.isclose(l3[-1], full[-1] / 8)
    assert yarn_mscale(40, 0.707) == pytest.approx(0.1 * 0.707 * math.log(40) + 1)


def test_z_loss_and_final_softcap(megatron_world1):
    arch = resolve_arch("llama3", "debug", z_loss_coeff=1e-2)
    model = build_model(arch, vocab_size=256, max_seq_length=16).eval()
    plain = build_model(resolve_arch("llama3", "debug"), vocab_size=256, max_seq_length=16).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    pos = torch.arange(16).expand_as(tokens)
    with torch.no_grad():
        logits = plain(tokens, pos, None)
        with_z = model(tokens, pos, None, labels=tokens)
        without = plain(tokens, pos, None, labels=tokens)
    torch.testing.assert_close(with_z - without, 1e-2 * logits.logsumexp(-1) ** 2)
    torch.testing.assert_close(z_loss(logits.transpose(0, 1)), logits.logsumexp(-1).transpose(0, 1) ** 2)

    capped = build_model(
        resolve_arch("llama3", "debug", final_softcap=0.5), vocab_size=256, max_seq_length=16
    ).eval()
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(capped(tokens, pos, None), 0.5 * torch.tanh(logits / 0.5))


def test_gemma_embedding_scale(megatron_world1):
    arch = resolve_arch("gemma2", "tiny", num_layers=1)
    model = build_model(arch, vocab_size=256, max_seq_length=64)
    tokens = torch.tensor([[3, 5]])
    out = model.embedding(input_ids=tokens, position_ids=None)  # (seq, batch, hidden)
    raw = model.embedding.word_embeddings.weight[tokens[0]]
    torch.testing.assert_close(out[:, 0], raw * math.sqrt(arch.hidden_size))
