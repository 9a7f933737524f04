"""Parameters and training FLOPs per token of a Llama-style architecture, and MFU defined on them.

Two published conventions, which differ only in the attention-score term:
- `megatron`: Megatron-LM `num_floating_point_operations` (training.py; Narayanan et al. 2021, Appendix):
  matmuls only, 3 GEMMs per weight (forward, dgrad, wgrad) x 2 FLOPs per multiply-add, and only half of the
  causal score matrix counted ("Only half of the attention matrix is non-zero").
- `torchtitan`: `6 * (parameters - embedding) + 12 * layers * heads * head_dim * seq` (llama3 `get_nparams_and_flops`:
  causal sparsity not counted; norm weights inside the 6N term).
MFU = achieved FLOPs (tokens/s x FLOPs per token) / peak FLOP/s of the hardware used.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.llama import LlamaArch
from train.errors import ConfigError


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    output: int
    """The LM head (0 when tied to the embedding)."""
    attention: int
    mlp: int
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.attention + self.mlp + self.norms

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_count(arch: LlamaArch, *, vocab_size: int) -> ParamCount:
    h, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    return ParamCount(
        embedding=vocab_size * h,
        output=0 if arch.tie_embeddings else vocab_size * h,
        attention=arch.num_layers * (h * q + 2 * h * kv + q * h),  # Wq, Wk, Wv, Wo; no biases
        mlp=arch.num_layers * 3 * h * arch.ffn_hidden_size,  # SwiGLU: W1, W3 (h -> ffn), W2 (ffn -> h)
        norms=arch.num_layers * 2 * h + h,  # two RMSNorms per layer + the final one
    )


CONVENTIONS = ("megatron", "torchtitan")


def flops_per_token(
    arch: LlamaArch, *, seq_length: int, vocab_size: int, convention: str = "megatron"
) -> float:
    """Training (forward + backward) FLOPs per token at context `seq_length`."""
    n = param_count(arch, vocab_size=vocab_size)
    q = arch.num_attention_heads * arch.head_dim
    if convention == "megatron":
        linear = 6 * (n.attention + n.mlp + vocab_size * arch.hidden_size)  # logits GEMM even when tied
        # QK^T and scores x V: 2 GEMMs of (s x d) per head, x 3 (fwd, 2 bwd) x 2 FLOPs, half the causal matrix.
        scores = 12 * arch.num_layers * q * seq_length / 2
        return linear + scores
    if convention == "torchtitan":
        return 6 * n.non_embedding + 12 * arch.num_layers * q * seq_length
    raise ConfigError("flops.convention", convention, f"choose one of {', '.join(CONVENTIONS)}")


def mfu(tokens_per_s: float, *, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware's peak (all GPUs of the job)."""
    return tokens_per_s * flops_per_token / peak_flops
