"""Per-position loss and the passkey probe: exact bucketing and scoring."""

from __future__ import annotations

import math

import pytest
import torch

from train.evals import beyond_ratio, bucket_edges, passkey_probe, passkey_sample, position_losses


def char_tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_position_losses_are_token_weighted_bucket_means(megatron_world1):
    from models.gpt import build_model
    from models.registry import resolve_arch

    torch.manual_seed(0)
    arch = resolve_arch("llama3", "tiny", num_layers=1, hidden_size=64, num_attention_heads=4, num_kv_heads=2)
    model = build_model(arch, vocab_size=256, max_seq_length=16)
    g = torch.Generator().manual_seed(1)
    micro = []
    for _ in range(2):
        tokens = torch.randint(0, 256, (2, 17), generator=g)
        mask = torch.ones(2, 16)
        mask[0, 3:7] = 0  # masked tokens must not count
        micro.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": mask,
                "position_ids": torch.arange(16).expand(2, -1),
            }
        )
    got = position_losses(model, micro, buckets=4)
    with torch.no_grad():
        per_token = [model(m["tokens"], m["position_ids"], None, labels=m["labels"]) for m in micro]
    for b, start in enumerate(bucket_edges(16, buckets=4)):
        num = sum(
            (lt[:, start : start + 4] * m["loss_mask"][:, start : start + 4]).sum()
            for lt, m in zip(per_token, micro)
        )
        den = sum(m["loss_mask"][:, start : start + 4].sum() for m in micro)
        assert got[b] == pytest.approx((num / den).item(), rel=1e-6)
    assert all(abs(x - math.log(256)) < 1.0 for x in got)  # a random model is near-uniform everywhere
    with pytest.raises(ValueError, match="buckets=5 must divide seq_length=16"):
        position_losses(model, micro, buckets=5)


def test_beyond_ratio_compares_buckets_past_the_base_context():
    assert beyond_ratio([2.0, 2.0, 3.0, 5.0], seq_length=1024, base_length=512) == pytest.approx(4.0 / 2.0)
    with pytest.raises(ValueError, match="base_length=1024"):
        beyond_ratio([1.0, 1.0], seq_length=1024, base_length=1024)


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
    assert sorted(out) == ["passkey/200/acc", "passkey/200/loss", "passkey/300/acc", "passkey/300/loss"]
    if uniform:  # argmax of equal logits is token 0, never a digit; the loss is log(vocab)
        assert out["passkey/200/acc"] == 0.0 and out["passkey/300/loss"] == pytest.approx(math.log(256))
    else:
        assert out["passkey/200/acc"] == 1.0 and out["passkey/300/loss"] < 1e-6
