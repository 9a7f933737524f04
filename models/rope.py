"""Rotary position embedding (Su et al. 2021) and its context-extension kinds, as inverse frequencies.

Each kind follows the formula `transformers` uses (modeling_rope_utils.py), so a converted checkpoint sees the same
angles: linear position interpolation (Chen et al. 2023: positions / factor == inv_freq / factor), dynamic NTK
(bloc97 2023: base * ((factor * L / L0) - (factor - 1))^(d / (d - 2)) once the sequence L passes L0), YaRN (Peng et
al. 2023, eq. 17-20: per-dimension ramp between interpolation and extrapolation, attention temperature
0.1 ln(factor) + 1) and Llama 3 (Dubey et al. 2024 / Meta's reference `apply_scaling`: long wavelengths divided by
factor, short kept, smooth in between).
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from models.arch import RopeScaling


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2, float32 (Su et al. 2021, eq. 15)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22; DeepSeek's `mscale`)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    # Peng et al. 2023, sec. 3.2 "NTK-by-parts": dimensions rotating fewer than beta_slow times over the original
    # context are interpolated, more than beta_fast extrapolated, a linear ramp between (HF `_compute_yarn_parameters`).
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_context / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = base_inv_freq(dim, theta)
    interpolation = extrapolation / s.factor
    keep = 1 - ramp  # 1 = extrapolate (high frequency)
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    inv_freq = base_inv_freq(dim, theta)
    low_wavelen = s.original_context / s.low_freq_factor
    high_wavelen = s.original_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq(dim: int, theta: float, scaling: RopeScaling, *, seq_length: int | None = None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) of `scaling.kind` for a sequence of `seq_length` (dynamic NTK depends on it)."""
    kind = scaling.kind
    if kind == "none":
        return base_inv_freq(dim, theta)
    if kind == "linear":
        return base_inv_freq(dim, theta) / scaling.factor
    if kind == "dynamic":
        if seq_length is None or seq_length <= scaling.original_context:
            return base_inv_freq(dim, theta)
        grown = theta * (scaling.factor * seq_length / scaling.original_context - (scaling.factor - 1)) ** (
            dim / (dim - 2)
        )
        return base_inv_freq(dim, grown)
    if kind == "yarn":
        return _yarn(dim, theta, scaling)
    if kind == "llama3":
        return _llama3(dim, theta, scaling)
    raise ValueError(kind)


def attention_scale(scaling: RopeScaling) -> float:
    """Factor on the attention logits implied by the RoPE kind: YaRN multiplies cos and sin by the attention factor
    (HF `_compute_yarn_parameters`: mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set, else
    mscale(s)), so q.k by its square. (MLA applies DeepSeek's YaRN inside megatron-core's own attention.)"""
    if scaling.kind != "yarn":
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    else:
        factor = yarn_mscale(scaling.factor)
    return factor**2


class KilnRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding (same output: (seq, 1, 1, dim) angles, applied by megatron's attention)
    with the inverse frequencies of any `RopeScaling` kind; megatron-core 0.16 has no dynamic NTK and fixes Llama 3's
    low/high frequency factors and original context."""

    def __init__(self, *, dim: int, theta: float, scaling: RopeScaling, cp_group=None) -> None:
        super().__init__(
            kv_channels=dim,
            rotary_percent=1.0,
            rotary_base=theta,
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.inv_freq = inv_freq(dim, theta, scaling)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if self.scaling.kind == "dynamic":
            device = self.inv_freq.device
            self.inv_freq = inv_freq(self.dim, self.theta, self.scaling, seq_length=max_seq_len + offset).to(
                device
            )
        return super().get_emb(max_seq_len, offset)
