"""Fused and compiled kernels (`model.fusion.*`): which run, and the one Kiln adds to megatron-core's.

Each one changes only how a piece is computed, never the parameters or checkpoints, and each has a CPU parity test
against the plain path (tests/models/test_fusions.py):

- `norm`: RMSNorm through torch's fused `F.rms_norm` kernel (models/blocks.py RMSNorm). fp32 CPU: bitwise equal to
  the plain math and ~35% faster per call; no compile step.
- `activation`: SwiGLU / GeGLU through megatron-core's `bias_activation_fusion` (megatron/core/fusions/
  fused_bias_swiglu.py, fused_bias_geglu.py: autograd Functions whose pieces megatron compiles with `torch.compile`,
  its `jit_fuser`). Within 2e-7 of the plain path in fp32; megatron's fused GeGLU is the tanh form Gemma uses, picked
  by `activation_func=F.gelu` (models/spec.py). On CPU it is slower per call (0.20 vs 0.15 ms fwd+bwd, 64x4x704)
  and the first call compiles C++ through inductor (2-17 s).
- `cross_entropy`: megatron-core's `cross_entropy_loss_fusion` (impl "native", megatron/core/fusions/
  fused_cross_entropy.py: one all-reduce for the predicted logit and the sum of exps, compiled pieces) with one
  change: megatron casts the logits' gradient to bfloat16 (`calculate_gradients`), 2e-3 off in fp32; Kiln's
  `fused_cross_entropy` reuses megatron's forward and returns the gradient in the logits' dtype (the same thing in
  bf16 training, exact in fp32). 25% faster per call on CPU after a ~6 s compile.
- `compile`: `torch.compile` on each transformer layer's forward (`nn.Module.compile`, in place, so parameter names
  and checkpoints do not change; torchtitan compiles per TransformerBlock the same way). Not bitwise: inductor
  reorders reductions (gradients ~3e-6 rel in fp32); the first step compiles (~14 s on 2 CPU cores).
- RoPE: megatron's `apply_rope_fusion` needs TransformerEngine (or Apex) and is not offered; `compile` covers the
  RoPE math inside each layer (megatron's RoPE compiled alone: 2.2x per call on CPU, exact to 7e-8, ~1.5% of a
  tiny-model step: not worth a setting and a compile of its own).

`auto` picks, per device, what is exact and not slower there: on CUDA the megatron fusions and the norm (the
kernels they were written for); on CPU only the norm (the compiled kernels cost seconds of compile per process
and gain little at the sizes a CPU trains, bench/RESULTS.md). `compile` is off unless asked for: it is not exact
and has not been measured on a GPU here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from train.errors import ConfigError

KERNELS = ("norm", "activation", "cross_entropy", "compile")
CHOICES = ("auto", "true", "false")
# What `auto` resolves to, by device type (see the module docstring and bench/RESULTS.md for why).
AUTO = {
    "cuda": {"norm": True, "activation": True, "cross_entropy": True, "compile": False},
    "cpu": {"norm": True, "activation": False, "cross_entropy": False, "compile": False},
}


@dataclass(frozen=True)
class Fusions:
    """The kernels a model runs, resolved (`resolve_fusions`); all False is the plain reference path."""

    norm: bool = False
    activation: bool = False
    cross_entropy: bool = False
    compile: bool = False


def fusion_choice(kernel: str, value: object) -> bool | None:
    """`model.fusion.<kernel>` as True, False or None (auto); on/off are taken for true/false (YAML reads them so)."""
    text = {"on": "true", "off": "false"}.get(str(value).lower(), str(value).lower())
    if text not in CHOICES:
        raise ConfigError(f"model.fusion.{kernel}", value, f"choose one of {', '.join(CHOICES)}")
    return None if text == "auto" else text == "true"


def resolve_fusions(device_type: str, **choices: object) -> Fusions:
    """The kernels to run on `device_type` (cpu, cuda) for `choices` (kernel -> auto/true/false; missing = auto)."""
    unknown = sorted(set(choices) - set(KERNELS))
    if unknown:
        raise ConfigError(
            f"model.fusion.{unknown[0]}", choices[unknown[0]], f"kernels are {', '.join(KERNELS)}"
        )
    auto = AUTO.get(device_type, AUTO["cpu"])
    picked = {k: fusion_choice(k, choices.get(k, "auto")) for k in KERNELS}
    return Fusions(**{k: auto[k] if v is None else v for k, v in picked.items()})


@functools.cache
def _cross_entropy_function():
    """Kiln's fused cross-entropy Function (built on first use: megatron-core's import costs seconds, and the config
    schema imports this module)."""
    from megatron.core import jit
    from megatron.core.fusions.fused_cross_entropy import _VocabParallelCrossEntropy
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as Parts

    def gradients(softmax, grad_output, target_mask, masked_target_1d):
        """megatron's fused `calculate_gradients` without its cast to bfloat16: (softmax - onehot) * grad_output."""
        grad_2d, arange_1d, update, grad_input = Parts.prepare_gradient_calculation_operands(
            softmax, target_mask
        )
        return Parts.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, update, grad_input, grad_output
        )

    fused_gradients = jit.jit_fuser(
        gradients
    )  # compiled like megatron's own pieces (torch.compile, torch >= 2.2)

    class FusedCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, vocab_parallel_logits, target, tp_group):
            ctx.logits_dtype = vocab_parallel_logits.dtype
            return _VocabParallelCrossEntropy.forward(ctx, vocab_parallel_logits, target, tp_group)

        @staticmethod
        def backward(ctx, grad_output):
            softmax, target_mask, masked_target_1d = ctx.saved_tensors
            grad = fused_gradients(softmax, grad_output, target_mask, masked_target_1d)
            return grad.to(ctx.logits_dtype), None, None

    return FusedCrossEntropy


def fused_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token cross-entropy of vocab-parallel `logits` (seq, batch, vocab / tp) against `target` (seq, batch):
    megatron-core's fused native kernel, gradient in the logits' dtype. Shifts `logits` in place (as megatron's)."""
    return _cross_entropy_function().apply(logits, target, tp_group)


def compile_layers(model: torch.nn.Module) -> int:
    """`torch.compile` each transformer layer in place (names and state dict unchanged); returns how many."""
    decoder = getattr(model, "decoder", None)
    layers = list(getattr(decoder, "layers", []))
    for layer in layers:
        layer.compile()
    return len(layers)
