"""Loss inside vs beyond the base context, the unscaled-RoPE baseline and the passkey probe: exact numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from train.evals import (
    QUESTION,
    base_context,
    context_metrics,
    passkey_probe,
    passkey_sample,
    rope_as,
    split_means,
    unscaled_arch,
)
from train.stage import StageConfig


def char_tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def recipe(**lc) -> dict[str, StageConfig]:
    return {
        "base": StageConfig(seq_length=256),
        "long_context": StageConfig(
            seq_length=1024, init_from="base", rope_scaling={"kind": "linear", "factor": 4.0}, **lc
        ),
        "anneal": StageConfig(
            seq_length=1024, init_from="long_context", rope_scaling={"kind": "linear", "factor": 4.0}
        ),
    }


def test_base_context_follows_the_init_from_chain():
    stages = recipe()
    assert [base_context(stages, n) for n in stages] == [256, 256, 256]
    stages["solo"] = StageConfig(seq_length=512, init_from="/some/checkpoint")
    assert base_context(stages, "solo") == 512


def test_unscaled_arch_is_the_parent_architecture_of_a_context_extension():
    from models.registry import resolve_arch

    model = resolve_arch("llama3", "tiny")
    stages = recipe()
    before = unscaled_arch(stages, "long_context", model)
    assert before == stages["base"].arch(model) and before.rope.kind == "none"
    assert unscaled_arch(stages, "base", model) is None  # random init: nothing to compare with
    assert unscaled_arch(stages, "anneal", model) is None  # same context as long_context
    # A longer context with the same RoPE (theta raised instead) still counts, with the old theta.
    raised = recipe(rope_theta=4 * model.rope_theta)
    raised["long_context"].rope_scaling = {}
    assert unscaled_arch(raised, "long_context", model).rope_theta == model.rope_theta


def test_rope_as_evaluates_the_same_weights_with_the_other_rope(megatron_world1):
    from models.arch import RopeScaling
    from models.gpt import build_model
    from models.registry import resolve_arch

    arch = resolve_arch("llama3", "tiny", num_layers=1, hidden_size=64, num_attention_heads=4, num_kv_heads=2)
    scaled = dataclasses.replace(arch, rope=RopeScaling(kind="linear", factor=4.0))
    torch.manual_seed(0)
    model = build_model(scaled, vocab_size=256, max_seq_length=64).eval()
    plain = build_model(arch, vocab_size=256, max_seq_length=64).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        before, want = model(tokens, pos, None), plain(tokens, pos, None)
        with rope_as([model], arch):
            got = model(tokens, pos, None)
        after = model(tokens, pos, None)
    assert (got - want).abs().max().item() < 1e-6  # == the model built with the old RoPE
    assert (before - want).abs().max().item() > 1e-3  # and the RoPE does matter
    assert torch.equal(after, before)  # restored


def test_split_means_and_context_metrics():
    losses = [4.0, 2.0, 3.0, 5.0, None, 6.0, 3.0, 3.0]  # 8 buckets of 128 over 1024
    assert split_means(losses, seq_length=1024, base_length=256) == (3.0, 4.0)  # (4+2)/2, (3+5+6+3+3)/5
    assert split_means(losses, seq_length=1024, base_length=200) is None  # not on a bucket edge
    assert split_means(losses, seq_length=1024, base_length=1024) is None  # nothing beyond
    got = context_metrics(
        {"code": losses, "docs": [1.0] * 8}, seq_length=1024, base_length=256, prefix="unscaled"
    )
    assert got == {
        "unscaled/inside/code": 3.0,
        "unscaled/beyond/code": 4.0,
        "unscaled/ratio/code": pytest.approx(4.0 / 3.0),
        "unscaled/inside/docs": 1.0,
        "unscaled/beyond/docs": 1.0,
        "unscaled/ratio/docs": 1.0,
    }
    assert context_metrics({"code": [1.0] * 8}, seq_length=256, base_length=256, prefix="context") == {}


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sample_hides_the_key_at_the_depth_and_asks_for_it(depth):
    s = passkey_sample(char_tokenize, context=400, depth=depth, key=73519)
    text = "".join(map(chr, s.tokens))
    assert len(s.tokens) == 400
    assert text.endswith("What is the pass key? The pass key is 73519")
    assert text[s.key_start :] == "73519"
    assert text[s.needle_at :].startswith("The pass key is 73519. Remember it. 73519 is the pass key. ")
    room = (
        400
        - len("The pass key is 73519. Remember it. 73519 is the pass key. ")
        - len("What is the pass key? The pass key is 73519")
    )
    assert s.needle_at == round(depth * room)
    with pytest.raises(ValueError, match="context=50 is too short"):
        passkey_sample(char_tokenize, context=50, depth=depth, key=1)


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token (or, if uniform, on none)."""

    def __init__(self, uniform: bool):
        super().__init__()
        self.uniform = uniform

    def forward(self, tokens, positions, mask, runtime_gather_output=False):
        logits = torch.zeros(*tokens.shape, 300)
        if not self.uniform:
            logits[0, :-1].scatter_(1, tokens[0, 1:, None], 50.0)
        return logits


class _Retriever(torch.nn.Module):
    """A model that "knows" the pass key when it can see it: it looks for the needle ("The pass key is ...")
    in its last `window` tokens before the question and predicts the 5 digits after it; otherwise all
    logits are equal (argmax token 0, never a digit)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, tokens, positions, mask, runtime_gather_output=False):
        ctx = tokens.shape[1]
        logits = torch.zeros(1, ctx, 300)
        prefix = char_tokenize("The pass key is ")
        question_at = ctx - 5 - len(QUESTION)
        seen = tokens[0, max(0, question_at - self.window) : question_at].tolist()
        for i in range(len(seen) - len(prefix) - 5 + 1):
            if seen[i : i + len(prefix)] == prefix:
                key = seen[i + len(prefix) : i + len(prefix) + 5]
                for j, t in enumerate(key):
                    logits[0, ctx - 6 + j, t] = 50.0
                break
        return logits


def test_passkey_probe_scores_by_context_and_depth():
    # ctx 200: the whole filler fits the window; ctx 300: the needle at depth 0 (tokens 0..58, the question
    # at 257) is past a 200-token window, at depth 0.5 (token 99) and 1.0 (198) it is inside.
    out = passkey_probe(
        _Retriever(window=200),
        char_tokenize,
        contexts=[200, 300],
        depths=[0.0, 0.5, 1.0],
        trials=3,
        vocab_size=256,
        device=torch.device("cpu"),
    )
    assert out["passkey/200/acc"] == 1.0 and out["passkey/200/loss"] < 1e-6
    assert [out[f"passkey/300/depth_{d}/acc"] for d in ("0", "0.5", "1")] == [0.0, 1.0, 1.0]
    assert out["passkey/300/acc"] == pytest.approx(2 / 3)
    assert out["passkey/300/loss"] == pytest.approx(math.log(256) / 3, rel=1e-4)  # misses: uniform over 256
    blind = passkey_probe(
        _Retriever(window=10),
        char_tokenize,
        contexts=[200],
        depths=[0.0, 1.0],
        trials=2,
        vocab_size=256,
        device=torch.device("cpu"),
    )
    assert blind["passkey/200/acc"] == 0.0 and blind["passkey/200/depth_1/acc"] == 0.0


@pytest.mark.parametrize("uniform", [False, True])
def test_passkey_probe_scores_accuracy_and_key_loss(uniform):
    out = passkey_probe(
        _Oracle(uniform),
        char_tokenize,
        contexts=[200, 300],
        depths=[0.0, 1.0],
        trials=2,
        vocab_size=256,
        device=torch.device("cpu"),
    )
    assert sorted(k for k in out if "depth" not in k) == [
        "passkey/200/acc",
        "passkey/200/loss",
        "passkey/300/acc",
        "passkey/300/loss",
    ]
    assert out["passkey/300/depth_0/acc"] == out["passkey/300/depth_1/acc"] == (0.0 if uniform else 1.0)
    if uniform:  # argmax of equal logits is token 0, never a digit; the loss is log(vocab)
        assert out["passkey/200/acc"] == 0.0 and out["passkey/300/loss"] == pytest.approx(math.log(256))
    else:
        assert out["passkey/200/acc"] == 1.0 and out["passkey/300/loss"] < 1e-6
