"""A plain-PyTorch, single-file Llama-style GPT: the hand-written reference `bench/train_throughput.py` measures Kiln
against (no framework: nn.Linear, SDPA, torch AdamW). Pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

    model = PlainGPT(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, ffn_hidden_size=704)
    loss = model.loss(tokens, labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of position x inverse frequency (Su et al. 2021), (seq, head_dim) in the rotate-half layout."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.attn_norm, self.mlp_norm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        ffn_hidden_size: int,
        rope_theta: float = 500_000.0,
        eps: float = 1e-5,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.head_dim, self.rope_theta = hidden_size // num_heads, rope_theta
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, num_kv_heads, ffn_hidden_size, eps) for _ in range(num_layers)
        )
        self.norm = RMSNorm(hidden_size, eps)
        self.out = nn.Linear(hidden_size, vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=init_std)

    def forward(self, tokens: Tensor) -> Tensor:
        cos, sin = rope_tables(tokens.shape[1], self.head_dim, self.rope_theta)
        cos, sin = cos.to(tokens.device), sin.to(tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.out(self.norm(x))  # (b, s, vocab)

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
