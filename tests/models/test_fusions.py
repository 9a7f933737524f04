"""The fused and compiled kernels (models/fusions.py) against the plain path, fp32 on CPU: same loss and gradients
within EXACT (1e-6 of each tensor's largest entry; measured <= 6e-7) for the fused norm, activation and
cross-entropy, COMPILED (5e-5; measured 6e-7 to 3e-6, inductor reorders reductions) for torch.compile per layer; a short
training run with the same per-step losses; and the `model.fusion` settings. TP=2: tests/models/test_fusions_tp.py.
"""

from __future__ import annotations

import pytest
import torch

from models.blocks import RMSNorm
from models.fusions import Fusions, fused_cross_entropy, resolve_fusions
from models.gpt import build_model
from tests.models.hf_helpers import CASES, SEQ, VOCAB, arch_of
from train.errors import ConfigError

EXACT = 1e-6
COMPILED = 5e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _pair(case: str, fusions: Fusions, **overrides):
    _, arch = arch_of(case)
    arch = arch.replace(**overrides)
    plain = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ)
    fused = build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ, fusions=fusions)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    pos = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst(plain, fused, tokens) -> tuple[float, float]:
    ref_loss, ref_grads = _loss_and_grads(plain, tokens)
    loss, grads = _loss_and_grads(fused, tokens)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    return rel(loss, ref_loss), max(rel(grads[n], g) for n, g in ref_grads.items())


@pytest.fixture
def tokens():
    torch.manual_seed(3)
    return torch.randint(0, VOCAB, (2, SEQ + 1))


@pytest.mark.parametrize("zero_centered", [False, True])
def test_fused_rms_norm_is_exact(zero_centered, monkeypatch):
    calls = []
    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain, fused = (
        RMSNorm(None, 64, zero_centered=zero_centered),
        RMSNorm(None, 64, zero_centered=zero_centered),
    )
    with torch.no_grad():
        plain.weight.uniform_(-0.5, 1.5)
        fused.weight.copy_(plain.weight)
    fused.fused = True
    x = torch.randn(16, 3, 64) * 3
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(16, 3, 64)
    y1, y2 = plain(x1), fused(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert calls, "the fused norm did not run torch's kernel"
    assert rel(y2, y1) <= EXACT and rel(x2.grad, x1.grad) <= EXACT
    assert rel(fused.weight.grad, plain.weight.grad) <= EXACT


@pytest.mark.parametrize("case", list(CASES))
def test_fused_activation_equals_plain(case, tokens, megatron_world1, monkeypatch):
    """SwiGLU (Llama; Mixtral's experts through the probability-weighted kernel) and GeGLU (Gemma 2, tanh form)
    through megatron's fused kernels."""
    import megatron.core.transformer.mlp as mlp

    calls = []
    for name in ("bias_swiglu_impl", "bias_geglu_impl", "weighted_bias_swiglu_impl"):
        real = getattr(mlp, name)
        monkeypatch.setattr(mlp, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    plain, fused = _pair(case, Fusions(activation=True))
    assert fused.config.bias_activation_fusion and not plain.config.bias_activation_fusion
    loss, grads = _worst(plain, fused, tokens)
    print(f"{case}: loss rel {loss:.1e}, worst grad rel {grads:.1e}")
    assert calls, "megatron's fused activation did not run"
    assert loss <= EXACT and grads <= EXACT


@pytest.mark.parametrize(
    ("case", "overrides"),
    [("llama3", {}), ("gemma2", {}), ("qwen2", {"z_loss_coeff": 1e-2})],  # soft-capping; tied + z-loss
)
def test_fused_cross_entropy_equals_plain(case, overrides, tokens, megatron_world1, monkeypatch):
    import models.gpt

    calls = []
    monkeypatch.setattr(
        models.gpt, "fused_cross_entropy", lambda *a: calls.append(1) or fused_cross_entropy(*a)
    )
    plain, fused = _pair(case, Fusions(cross_entropy=True), **overrides)
    loss, grads = _worst(plain, fused, tokens)
    assert calls, "the fused cross-entropy did not run"
    print(f"{case} cross-entropy: loss rel {loss:.1e}, worst grad rel {grads:.1e}")
    assert loss <= EXACT and grads <= EXACT


def test_megatron_native_cross_entropy_rounds_fp32_gradients(megatron_world1):
    """Why Kiln wraps it: megatron's native fused cross-entropy returns the logits' gradient rounded to bfloat16
    (fused_cross_entropy.py calculate_gradients). Kiln's keeps fp32. If megatron stops rounding, this fails and
    Kiln can call megatron's function directly."""
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits, target = torch.randn(8, 2, 256) * 2, torch.randint(0, 256, (8, 2))
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, fn in (
        ("plain", lambda x: vocab_parallel_cross_entropy(x, target)),
        ("megatron", lambda x: fused_vocab_parallel_cross_entropy(x, target, group)),
        ("kiln", lambda x: fused_cross_entropy(x, target, group)),
    ):
        x = logits.clone().requires_grad_()
        loss = fn(x.clone())  # the fused kernels shift their input in place
        loss.sum().backward()
        grads[name] = (loss.detach(), x.grad)
    assert rel(grads["kiln"][0], grads["plain"][0]) <= EXACT
    assert rel(grads["kiln"][1], grads["plain"][1]) <= EXACT
    assert rel(grads["megatron"][1], grads["plain"][1]) > 1e-4


def test_compiled_layers_equal_plain(tokens, megatron_world1):
    plain, compiled = _pair("llama3", Fusions(compile=True))
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints keep their names
    assert all(layer._compiled_call_impl is not None for layer in compiled.decoder.layers)
    loss, grads = _worst(plain, compiled, tokens)
    print(f"compile: loss rel {loss:.1e}, worst grad rel {grads:.1e}")
    assert loss <= COMPILED and grads <= COMPILED


def _train(model, batches, *, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(steps):
        loss, _ = _loss_and_grads(model, batches[step])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compiled", [False, True], ids=["fused", "fused+compiled"])
def test_training_with_every_fusion_gives_the_same_losses(compiled, megatron_world1):
    torch.manual_seed(5)
    batches = torch.randint(0, VOCAB, (1, 4, SEQ + 1)).expand(6, -1, -1)  # one batch, learnt by heart
    plain, fused = _pair("llama3", Fusions(norm=True, activation=True, cross_entropy=True, compile=compiled))
    ref, got = _train(plain, batches, steps=6), _train(fused, batches, steps=6)
    print("plain", ref, "\nfused", got)
    assert ref[-1] < ref[0] - 0.5  # it learns
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) <= (COMPILED if compiled else EXACT)


def test_auto_resolves_per_device():
    assert resolve_fusions("cpu") == Fusions(norm=True)
    assert resolve_fusions("cuda") == Fusions(norm=True, activation=True, cross_entropy=True)
    assert resolve_fusions("cpu", norm="false", compile="true", activation=True) == Fusions(
        activation=True, compile=True
    )
    with pytest.raises(ConfigError, match=r"model.fusion.norm='maybe': choose one of auto, true, false"):
        resolve_fusions("cpu", norm="maybe")
    with pytest.raises(ConfigError, match="model.fusion.rope.*kernels are norm, activation"):
        resolve_fusions("cpu", rope="true")


def test_model_config_takes_the_fusions():
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    cfg = to_config(compose_cfg(["model=llama_tiny", "model.fusion.compile=true", "model.fusion.norm=off"]))
    assert cfg.model.fusion.resolve("cpu") == Fusions(compile=True)
    assert "fusion" not in vars(cfg.model.arch())
    assert to_config(compose_cfg(["model=llama_tiny"])).model.fusion.resolve("cpu") == Fusions(norm=True)
    with pytest.raises(ConfigError, match="model.fusion.activation"):
        to_config(compose_cfg(["model=llama_tiny", "model.fusion.activation=fast"]))
