"""The Llama-style megatron-core GPTModel: sizes, shapes, gradients, and what RoPE scaling changes."""

from __future__ import annotations

import pytest
import torch

from models.gpt import build_model
from models.llama import llama_ffn_size, padded_vocab_size
from models.registry import resolve_arch, sizes
from train.errors import ConfigError


def test_llama3_8b_size_is_the_published_one():
    arch = sizes("llama3")["8B"]
    assert arch.ffn_hidden_size == 14336 and arch.head_dim == 128 and arch.num_kv_heads == 8
    # Parameters with the 128,256-token vocabulary: 8.03B (Dubey et al. 2024).
    d, f, L, V, kv = 4096, 14336, 32, 128256, 8 * 128
    n = V * d * 2 + L * (d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d) + d
    assert abs(n - 8.03e9) / 8.03e9 < 0.01


def test_ffn_rounding():
    assert llama_ffn_size(256, multiple_of=64) == 704
    assert padded_vocab_size(1000, tp=2) == 1024 and padded_vocab_size(4096, tp=1) == 4096


def test_overrides_are_validated():
    assert resolve_arch("llama3", "tiny", num_layers=2).num_layers == 2
    with pytest.raises(ConfigError, match="model.size='9B'"):
        resolve_arch("llama3", "9B")
    with pytest.raises(ConfigError, match="model.num_kv_heads=3"):
        resolve_arch("llama3", "tiny", num_kv_heads=3)


def _tiny():
    return resolve_arch(
        "llama3",
        "tiny",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=160,
    )


def test_forward_backward_shapes_and_param_count(megatron_world1):
    arch = _tiny()
    torch.manual_seed(0)
    model = build_model(arch, vocab_size=300, max_seq_length=32)
    V = padded_vocab_size(300, tp=1)
    d, f, kv = arch.hidden_size, arch.ffn_hidden_size, arch.num_kv_heads * arch.head_dim
    expected = 2 * V * d + arch.num_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
    assert sum(p.numel() for p in model.parameters()) == expected
    tokens = torch.randint(0, 300, (3, 32))
    pos = torch.arange(32).expand(3, -1)
    logits = model(tokens, pos, None)
    assert logits.shape == (3, 32, V)
    losses = model(tokens, pos, None, labels=tokens)
    assert losses.shape == (3, 32)
    ref = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, V), tokens.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(losses.reshape(-1), ref, rtol=1e-5, atol=1e-5)
    losses.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_attention_is_causal(megatron_world1):
    model = build_model(_tiny(), vocab_size=300, max_seq_length=32).eval()
    tokens = torch.randint(0, 300, (1, 32))
    pos = torch.arange(32).unsqueeze(0)
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 300
    with torch.no_grad():
        a, b = model(tokens, pos, None), model(changed, pos, None)
    torch.testing.assert_close(a[0, :20], b[0, :20])
    assert not torch.allclose(a[0, 20:], b[0, 20:])


def test_rope_scaling_changes_positions_not_weights(megatron_world1):
    torch.manual_seed(0)
    base = build_model(_tiny(), vocab_size=300, max_seq_length=32).eval()
    scaled = build_model(_tiny(), vocab_size=300, max_seq_length=128, rope_scaling_factor=4.0).eval()
    assert base.state_dict().keys() == scaled.state_dict().keys()
    scaled.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        out_base = base(tokens, torch.arange(32).unsqueeze(0), None)
        out_scaled = scaled(tokens, torch.arange(32).unsqueeze(0), None)
    assert not torch.allclose(out_base, out_scaled)
    # Linear interpolation: the rotary angles at position 4p under x4 equal those at p without scaling.
    freqs_base = base.rotary_pos_emb(32)
    freqs_scaled = scaled.rotary_pos_emb(128)
    torch.testing.assert_close(freqs_scaled[::4], freqs_base)
