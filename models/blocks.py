"""Building blocks megatron-core 0.16 lacks, as plain torch modules that plug into its layer specs.

- `RMSNorm` (Zhang & Sennrich 2019), optionally scaling by (1 + weight) (Gemma), computed in float32 as HF does;
  its weight is tagged for megatron's sequence-parallel grad all-reduce. `fused` (models/fusions.py, set by
  build_model) normalizes through torch's `F.rms_norm` kernel: the same math, and the same rounding order.
- `PostNormRowParallelLinear`: megatron's RowParallelLinear followed by an RMSNorm - the "post" half of Gemma 2's
  sandwich norm (norm after attention and after the MLP, before the residual add; Gemma Team 2024, sec. 2).
- `CoreAttention`: causal softmax attention with a sliding window, attention-logit soft-capping
  (c tanh(x / c), Gemma 2) and separate key/value head dims (MLA), the kwargs megatron's attention passes; through
  `torch.nn.functional.scaled_dot_product_attention` (fused kernels: FlashAttention / cuDNN on GPU, the flash CPU
  kernel on CPU) unless `sdpa=False` or soft-capping is on (SDPA has no score modifier: the unfused path).
  Under context parallelism (cp > 1) it attends this rank's queries to the all-gathered keys and values
  (parallel/context.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import RowParallelLinear
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w  (or * (1 + w) when zero-centered, Gemma)."""

    def __init__(
        self, config=None, hidden_size: int = 0, eps: float = 1e-5, *, zero_centered: bool | None = None, **_
    ):
        super().__init__()
        if zero_centered is None:
            zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.zero_centered, self.eps = zero_centered, eps
        self.fused = False
        dtype = getattr(config, "params_dtype", torch.float32)
        init = torch.zeros if zero_centered else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=dtype))
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        if self.fused:
            h = F.rms_norm(h, h.shape[-1:], eps=self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:  # Gemma: (1 + w) in float32, then cast (HF Gemma2RMSNorm)
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)  # Llama: cast first, then scale (HF LlamaRMSNorm)


class PostNormRowParallelLinear(RowParallelLinear):
    """RowParallelLinear, then RMSNorm of its (reduced) output. The norm acts per token, so it is the same whether
    the output is whole or split over the sequence (SP); its weight is replicated like every norm's."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        assert not kwargs.get("bias"), "the post-norm follows a bias-free projection"
        self.post_norm = RMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_: Tensor, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return self.post_norm(out), bias


class CoreAttention(nn.Module):
    """softmax(scale q k^T, causal [+ window]) v on this rank's heads. q: (sq, b, heads, dk), k: (sk, b, groups,
    dk), v: (sk, b, groups, dv) -> (sq, b, heads * dv). Built by megatron's SelfAttention/MLASelfAttention."""

    def __init__(
        self,
        *,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        window: int | None = None,
        softcap: float | None = None,
        sdpa: bool = True,
        pg_collection=None,
        **_,
    ):
        super().__init__()
        self.layer_number = layer_number
        dk = k_channels or config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else dk**-0.5
        self.window, self.softcap = window, softcap
        self.sdpa = sdpa and softcap is None
        self.cp_group = getattr(pg_collection, "cp", None)  # context parallel: parallel/context.py

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, *args, **kwargs
    ) -> Tensor:
        group = self.cp_group
        if group is not None and group.size() > 1:  # this rank's queries against the all-gathered K/V
            from parallel import context

            return context.attention(
                self._attend,
                query,
                key,
                value,
                cp=group.size(),
                rank=group.rank(),
                gather=lambda t: context.gather_sequence(t, group),
                window=self.window,
            )
        return self._attend(query, key, value)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Causal attention, the queries being the last sq of the sk key positions."""
        if self.sdpa:
            return self._sdpa(query, key, value)
        sq, b, heads, _ = query.shape
        sk = key.shape[0]
        rep = heads // key.shape[2]
        if rep > 1:  # GQA/MQA: each KV group serves `rep` query heads
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        q = query.permute(1, 2, 0, 3)  # (b, heads, sq, dk)
        k = key.permute(1, 2, 3, 0)  # (b, heads, dk, sk)
        v = value.permute(1, 2, 0, 3)  # (b, heads, sk, dv)
        scores = torch.matmul(q, k) * self.scale  # (b, heads, sq, sk)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        scores = scores.masked_fill(self._masked(sq, sk, scores.device), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # (b, heads, sq, dv)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _masked(self, sq: int, sk: int, device) -> Tensor:
        """(sq, sk) True where query i may not see key j: the future, and beyond the window."""
        i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        j = torch.arange(sk, device=device).unsqueeze(0)
        masked = j > i
        if self.window is not None:  # keep the last `window` positions, itself included
            masked = masked | (i - j >= self.window)
        return masked

    def _sdpa(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        sq, b, heads, _ = query.shape
        sk, groups = key.shape[0], key.shape[2]
        q = query.permute(1, 2, 0, 3)  # (b, heads, sq, dk)
        k = key.permute(1, 2, 0, 3)  # (b, groups, sk, dk)
        v = value.permute(1, 2, 0, 3)  # (b, groups, sk, dv)
        if groups != heads:  # GQA/MQA: each KV group serves heads / groups query heads
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        if self.window is None and sq == sk:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            allowed = ~self._masked(sq, sk, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # (sq, b, heads * dv)
