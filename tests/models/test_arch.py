"""The architecture description: factories, overrides, and one clear error per bad input."""

from __future__ import annotations

import pytest

from models.arch import Arch
from models.registry import FAMILIES, resolve_arch
from train.errors import ConfigError


def test_every_family_has_a_tiny_size_that_validates():
    for family in FAMILIES:
        assert isinstance(resolve_arch(family, "tiny"), Arch)


def test_published_shapes():
    g = resolve_arch("gemma2", "9B")
    assert (g.head_dim, g.is_windowed(0), g.is_windowed(1), g.attn_softcap, g.final_softcap) == (
        256,
        True,
        False,
        50,
        30,
    )
    m = resolve_arch("mixtral", "8x22B")
    assert (m.moe.num_experts, m.moe.top_k, m.head_dim) == (8, 2, 128)
    d = resolve_arch("deepseek_v2", "V2-Lite")
    assert (d.is_moe_layer(0), d.is_moe_layer(1), d.moe.shared_ffn_hidden_size, d.mla.kv_lora_rank) == (
        False,
        True,
        2816,
        512,
    )
    assert resolve_arch("qwen2", "0.5B").qkv_bias and resolve_arch("qwen2", "0.5B").tie_embeddings
    assert resolve_arch("llama3", "405B").rope.kind == "llama3"


def test_nested_overrides_take_dicts():
    a = resolve_arch("llama3", "tiny", rope={"kind": "yarn", "factor": 4.0}, sliding_window=32)
    assert a.rope.kind == "yarn" and a.rope.factor == 4.0 and a.sliding_window == 32
    m = resolve_arch("mixtral", "tiny", moe={"top_k": 1})
    assert m.moe.top_k == 1 and m.moe.num_experts == 8


@pytest.mark.parametrize(
    ("family", "size", "overrides", "match"),
    [
        ("gpt5", "tiny", {}, "model.family='gpt5'.*llama3"),
        ("llama3", "9B", {}, "model.size='9B'.*8B"),
        ("llama3", "tiny", {"num_kv_heads": 3}, r"model.num_kv_heads=3.*\[1, 2, 4, 8\]"),
        ("llama3", "tiny", {"num_attention_heads": 7}, "model.num_attention_heads=7"),
        ("mixtral", "tiny", {"moe": {"top_k": 9}}, "model.moe.top_k=9.*1..num_experts=8"),
        ("mixtral", "tiny", {"moe": {"expert_bias": True}}, "model.moe.expert_bias.*sigmoid"),
        ("llama3", "tiny", {"rope": {"kind": "ntk"}}, "model.rope.kind='ntk'"),
        ("llama3", "tiny", {"rope": {"turbo": 1}}, "model.rope.turbo"),
        ("llama3", "tiny", {"activation": "relu"}, "model.activation='relu'"),
        ("llama3", "tiny", {"bogus": 1}, "model.bogus"),
        ("deepseek_v2", "tiny", {"num_kv_heads": 2}, "model.num_kv_heads=2.*MLA"),
        ("llama3", "tiny", {"sliding_window": 0}, "model.sliding_window=0"),
    ],
)
def test_bad_input_names_the_field(family, size, overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_arch(family, size, **overrides)


def test_window_larger_than_context_is_refused():
    with pytest.raises(ConfigError, match="model.sliding_window=512.*context \\(256\\)"):
        resolve_arch("mistral", "tiny", sliding_window=512, max_seq_length=256)


def test_model_config_extra_overrides_reach_the_arch():
    from train.config import ModelConfig

    cfg = ModelConfig(
        family="gemma2",
        size="tiny",
        num_layers=2,
        extra={"sliding_window": 8, "rope": {"kind": "linear", "factor": 2.0}},
    )
    arch = cfg.arch()
    assert (arch.num_layers, arch.sliding_window, arch.rope.factor) == (2, 8, 2.0)
    with pytest.raises(ConfigError, match="model.extra.num_layers"):
        ModelConfig(num_layers=2, extra={"num_layers": 3})
