"""MoE routing features on megatron-core's router, checked against the formulas they implement, and the
expert-load statistics against counts made by hand."""

from __future__ import annotations

import math

import torch

from models.gpt import build_model
from models.moe import expert_load_stats, load_summary
from models.registry import resolve_arch


def _capture_router_inputs(model):
    seen = []
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(lambda m, i, o, seen=seen: seen.append((m, i[0].detach())))
    return seen


def _run(model, seed=0, seq=32):
    torch.manual_seed(seed)
    tokens = torch.randint(0, 256, (2, seq))
    pos = torch.arange(seq).expand_as(tokens)
    return model(tokens, pos, None, labels=tokens)


def test_load_summary_numbers():
    low, high, entropy = load_summary(torch.tensor([5.0, 5.0, 5.0, 5.0]))
    assert (low, high) == (1.0, 1.0) and math.isclose(entropy, 1.0)
    low, high, entropy = load_summary(torch.tensor([0.0, 0.0, 0.0, 8.0]))
    assert (low, high, entropy) == (0.0, 4.0, 0.0)
    low, high, entropy = load_summary(torch.tensor([1.0, 3.0]))
    assert (low, high) == (0.5, 1.5)
    assert math.isclose(entropy, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2))


def test_expert_load_stats_count_the_routers_choices(megatron_world1):
    arch = resolve_arch("mixtral", "tiny", num_layers=2)
    model = build_model(arch, vocab_size=256, max_seq_length=32).eval()
    seen = _capture_router_inputs(model)
    with torch.no_grad():
        _run(model)
    stats = expert_load_stats(model)
    for i, (router, x) in enumerate(seen):
        logits = x.reshape(-1, x.shape[-1]) @ router.weight.t()  # (tokens, experts)
        chosen = logits.topk(arch.moe.top_k, dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=arch.moe.num_experts).double()
        low, high, entropy = load_summary(counts)
        assert counts.sum() == 64 * arch.moe.top_k
        assert (stats[f"moe/layer{i}/min"], stats[f"moe/layer{i}/max"]) == (low, high)
        assert math.isclose(stats[f"moe/layer{i}/entropy"], entropy)
    assert stats["moe/max"] == max(stats["moe/layer0/max"], stats["moe/layer1/max"])
    assert expert_load_stats(model)["moe/layer0/max"] == 0.0  # read resets


def test_aux_loss_and_router_z_loss_match_their_formulas(megatron_world1):
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    arch = resolve_arch("mixtral", "tiny", num_layers=1, moe={"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001})
    model = build_model(arch, vocab_size=256, max_seq_length=32).train()
    seen = _capture_router_inputs(model)
    clear_aux_losses_tracker()
    _run(model).sum().backward()
    tracker = get_moe_layer_wise_logging_tracker()
    router, x = seen[0]
    logits = x.reshape(-1, x.shape[-1]) @ router.weight.t()
    e, k, t = arch.moe.num_experts, arch.moe.top_k, logits.shape[0]
    probs = logits.softmax(-1)
    counts = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=e).float()
    # Switch Transformer (Fedus et al. 2021, eq. 4) with top-k: E * sum_i f_i P_i, f_i = count_i / (T k).
    switch = e * ((counts / (t * k)) * probs.mean(0)).sum()
    torch.testing.assert_close(tracker["load_balancing_loss"]["values"][0], switch, rtol=1e-5, atol=1e-6)
    # ST-MoE z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.
    torch.testing.assert_close(
        tracker["z_loss"]["values"][0], logits.logsumexp(-1).pow(2).mean(), rtol=1e-5, atol=1e-6
    )
    assert router.weight.grad is not None


def test_aux_loss_free_expert_bias_moves_toward_balance(megatron_world1):
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    arch = resolve_arch(
        "mixtral",
        "tiny",
        num_layers=1,
        moe={"score_function": "sigmoid", "expert_bias": True, "bias_update_rate": 0.01},
    )
    model = build_model(arch, vocab_size=256, max_seq_length=32).train()
    router = model.decoder.layers[0].mlp.router
    assert router.expert_bias.abs().sum() == 0 and not isinstance(router.expert_bias, torch.nn.Parameter)
    _run(model).sum().backward()
    counts = router.local_tokens_per_expert.clone()
    assert counts.sum() == 64 * arch.moe.top_k
    _update_router_expert_bias([model], model.config)
    # DeepSeek-V3 (sec. 2.1.2): bias += gamma * sign(mean load - load): overloaded experts go down, others up.
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(router.expert_bias, expected)


def test_capacity_drops_tokens_dropless_does_not(megatron_world1):
    dropless = build_model(
        resolve_arch("mixtral", "tiny", num_layers=1), vocab_size=256, max_seq_length=32
    ).eval()
    capped = build_model(
        resolve_arch("mixtral", "tiny", num_layers=1, moe={"capacity_factor": 0.25}),
        vocab_size=256,
        max_seq_length=32,
    ).eval()
    capped.load_state_dict(dropless.state_dict())
    torch.manual_seed(0)
    x = torch.randn(32, 2, 256)  # (seq, batch, hidden)
    with torch.no_grad():
        full, _ = dropless.decoder.layers[0].mlp(x)
        cut, _ = capped.decoder.layers[0].mlp(x)
    # At a quarter of the fair share most assignments are dropped: some tokens get no expert output at all.
    untouched = (cut.abs().sum(-1) == 0).sum().item()
    assert untouched > 0 and (full.abs().sum(-1) == 0).sum().item() == 0
