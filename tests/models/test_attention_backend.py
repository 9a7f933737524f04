"""The fused core attention (SDPA) against the reference path (`local`: megatron-core's unfused
DotProductAttention, or the plain-torch math where megatron lacks the feature): same weights, same logits and
gradients in fp32, for every family; and the backend choice itself."""

from __future__ import annotations

import pytest
import torch

from models.arch import attention_backend
from models.blocks import CoreAttention
from models.gpt import build_model
from tests.models.hf_helpers import CASES, SEQ, VOCAB, arch_of
from train.errors import ConfigError

TOL = 1e-5


def _logits_and_grads(model, tokens):
    model.zero_grad()
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, pos, None)
    loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_equals_local(case, megatron_world1):
    _, arch = arch_of(case)
    local = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ, attention_backend="local")
    sdpa = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ, attention_backend="sdpa")
    sdpa.load_state_dict(local.state_dict())
    cores = [m for m in sdpa.modules() if isinstance(m, CoreAttention)]
    # Every layer runs the fused kernel except soft-capped ones (Gemma 2), which keep the exact math.
    assert len(cores) == arch.num_layers
    assert all(c.sdpa == (arch.attn_softcap is None) for c in cores)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    ref_logits, ref_grads = _logits_and_grads(local, tokens)
    logits, grads = _logits_and_grads(sdpa, tokens)
    diff = (logits - ref_logits).abs().max().item()
    grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    print(f"{case}: max |logit diff| {diff:.2e}, max |grad diff| {grad_diff:.2e}")
    assert ref_logits.std() > 0.1
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    assert diff <= TOL and grad_diff <= TOL


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_core_attention_gqa_window_and_value_dims(window):
    """GQA (4 query heads on 2 KV groups), a window, and a value head dim unlike the key's (MLA)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(12, 2, 4, 8), torch.randn(12, 2, 2, 8), torch.randn(12, 2, 2, 6)

    class Cfg:
        kv_channels = 8

    fused = CoreAttention(config=Cfg(), layer_number=1, window=window, sdpa=True)
    plain = CoreAttention(config=Cfg(), layer_number=1, window=window, sdpa=False)
    assert fused.sdpa and not plain.sdpa
    out = fused(q, k, v)
    assert out.shape == (12, 2, 4 * 6)
    torch.testing.assert_close(out, plain(q, k, v), rtol=1e-5, atol=1e-6)


def test_backend_choice():
    assert attention_backend("sdpa") == "sdpa" and attention_backend("local") == "local"
    has_te = attention_backend("auto") == "te"
    if not has_te:  # this machine has no TransformerEngine: te is refused by name
        with pytest.raises(ConfigError, match="transformer_engine does not import"):
            attention_backend("te")
    with pytest.raises(
        ConfigError, match="model.attention_backend.*flash.*choose one of auto, sdpa, local, te"
    ):
        attention_backend("flash")


def test_model_config_takes_the_backend():
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    cfg = to_config(compose_cfg(["model=llama_tiny", "model.attention_backend=local"]))
    assert cfg.model.attention_backend == "local"
    assert "attention_backend" not in vars(cfg.model.arch())
    with pytest.raises(ConfigError, match="model.attention_backend"):
        to_config(compose_cfg(["model=llama_tiny", "model.attention_backend=flash"]))


def test_rope_without_the_empty_concat_is_bitwise_the_same(megatron_world1):
    import megatron.core.models.common.embeddings.rope_utils as R

    from parallel.fixes import skip_empty_rope_concat

    skip_empty_rope_concat()
    assert R._apply_rotary_pos_emb_bshd.__code__.co_filename.startswith("<kiln patch")
    torch.manual_seed(0)
    t, freqs = torch.randn(6, 2, 4, 8), torch.randn(6, 1, 1, 8)
    cos, sin = freqs.cos(), freqs.sin()
    half = torch.cat((-t[..., 4:], t[..., :4]), dim=-1)
    assert torch.equal(R._apply_rotary_pos_emb_bshd(t, freqs), t * cos + half * sin)
    # Partial rotary (RoPE on the first 4 of 8 dims) still appends the untouched dims.
    part = R._apply_rotary_pos_emb_bshd(t, freqs[..., :4])
    assert torch.equal(part[..., 4:], t[..., 4:]) and part.shape == t.shape
