"""`build_model`: the one place an `Arch` becomes a megatron-core GPTModel.

`KilnGPTModel` adds to megatron-core's GPTModel only what it lacks: RoPE scaling kinds (models/rope.py), embedding
scaling by sqrt(d) (Gemma), final-logit soft-capping (Gemma 2), the output z-loss (PaLM), and the fused
cross-entropy with the gradient in the logits' dtype (models/fusions.py).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from megatron.core.models.gpt import GPTModel

from models.arch import Arch, RopeScaling
from models.arch import attention_backend as resolve_backend
from models.blocks import RMSNorm
from models.fusions import Fusions, compile_layers, fused_cross_entropy
from models.llama import padded_vocab_size
from models.rope import KilnRotaryEmbedding
from models.spec import block_spec, transformer_config


class KilnGPTModel(GPTModel):
    def __init__(self, *, arch: Arch, **kwargs):
        super().__init__(**kwargs)
        self.arch = arch
        self.fused_cross_entropy = False
        if self.position_embedding_type == "rope" and arch.mla is None:
            self.rotary_pos_emb = KilnRotaryEmbedding(
                dim=arch.head_dim, theta=arch.rope_theta, scaling=arch.rope, cp_group=self.pg_collection.cp
            )
        if arch.embedding_scale and self.pre_process:
            # Gemma: h = embed(x) * sqrt(d), the factor rounded to the activation dtype (HF Gemma2Model).
            scale = math.sqrt(arch.hidden_size)
            self.embedding.register_forward_hook(lambda m, i, out: out * torch.tensor(scale, dtype=out.dtype))
        if arch.final_softcap is not None and self.post_process:
            cap = arch.final_softcap
            # Elementwise, so it applies to this rank's vocab shard before the vocab-parallel loss.
            self.output_layer.register_forward_hook(
                lambda m, i, out: (cap * torch.tanh(out[0] / cap), *out[1:])
            )

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (batch, seq), + z_loss_coeff * logsumexp(logits)^2 (Chowdhery et al. 2022,
        sec. 5), the log-normalizer summed over the vocab shards of all tensor-parallel ranks."""
        # Before the cross-entropy: megatron's vocab-parallel CE shifts the logits in place.
        extra = self.arch.z_loss_coeff * z_loss(logits).transpose(0, 1) if self.arch.z_loss_coeff else None
        if self.fused_cross_entropy:
            loss = fused_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp)
            loss = loss.transpose(0, 1).contiguous()  # (seq, batch) -> (batch, seq)
        else:
            loss = super().compute_language_model_loss(labels, logits)
        return loss if extra is None else loss + extra


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the full (tensor-parallel split) vocabulary, squared: (seq, batch)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()  # (seq, batch, vocab / tp)
    peak = logits.max(dim=-1, keepdim=True).values.detach()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            peak, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
        )
    total = reduce_from_tensor_model_parallel_region((logits - peak).exp().sum(dim=-1))
    lse = total.log() + peak.squeeze(-1)
    return lse**2


def _engine_stage(config) -> tuple[object, dict]:
    """The training engine's pipeline-stage seam (parallel/engines/megatron.py `model_stage`), when active: it swaps
    `megatron.core.models.gpt.GPTModel` for a function holding the stage flags and the layout's config overrides
    (pp, vpp, ep, etp, recompute, ...). KilnGPTModel is a subclass the swap cannot reach, so read them from it and
    apply them here, before the layer specs are chosen (they depend on pp)."""
    import inspect

    import megatron.core.models.gpt as gpt

    if gpt.GPTModel is GPTModel:
        return config, {}
    seam = inspect.getclosurevars(gpt.GPTModel).nonlocals
    config = dataclasses.replace(config, **seam["overrides"](config))
    return config, {k: seam[k] for k in ("pre_process", "post_process", "vp_stage")}


def build_model(
    arch: Arch,
    *,
    vocab_size: int,
    max_seq_length: int,
    tp: int = 1,
    sp: bool = False,
    ep: int = 1,
    etp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    vp_stage: int | None = None,
    rope_scaling_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
    config_overrides: dict | None = None,
    attention_backend: str = "auto",
    fusions: Fusions | None = None,
) -> KilnGPTModel:
    """A megatron-core GPTModel for `arch` at this layout (this pipeline stage's layers; `vp_stage` for interleaved
    PP). `rope_scaling_factor` > 1 switches RoPE to linear position interpolation (a long-context stage, Chen et al.
    2023); it changes no weights, so a checkpoint loads either way. The vocabulary is padded for TP.
    `config_overrides`: TransformerConfig fields the engine sets (recompute, pipeline p2p; parallel/engines/).
    `attention_backend`: the core-attention backend (models/spec.py attention_backend: auto, sdpa, local or te).
    `fusions`: the fused/compiled kernels to run (models/fusions.py resolve_fusions); None = the plain path."""
    from megatron.core import parallel_state

    from parallel.fixes import (
        apply_megatron_fixes,
        fix_mla_kpos_grad,
        fix_moe_mla_without_te,
        skip_empty_rope_concat,
    )

    apply_megatron_fixes()
    skip_empty_rope_concat()
    fix_moe_mla_without_te()
    if arch.mla is not None:
        fix_mla_kpos_grad()
    if rope_scaling_factor != 1.0:
        arch = dataclasses.replace(arch, rope=RopeScaling(kind="linear", factor=rope_scaling_factor))
    arch.validate(max_seq_length=max_seq_length)
    fusions = fusions or Fusions()
    config = transformer_config(
        arch, tp=tp, sp=sp, ep=ep, etp=etp, pp=pp, vpp=vpp, dtype=dtype, fused_activation=fusions.activation
    )
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage) if pp > 1 else True
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage) if pp > 1 else True
    config, stage = _engine_stage(config)
    pre, post = stage.get("pre_process", pre), stage.get("post_process", post)
    vp_stage = stage.get("vp_stage", vp_stage)
    model = KilnGPTModel(
        arch=arch,
        config=config,
        transformer_layer_spec=block_spec(
            arch, config, vp_stage=vp_stage, backend=resolve_backend(attention_backend)
        ),
        vocab_size=padded_vocab_size(vocab_size, tp),
        max_sequence_length=max_seq_length,
        pre_process=pre,
        post_process=post,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        vp_stage=vp_stage,
    )
    model.fused_cross_entropy = fusions.cross_entropy
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = fusions.norm
    if fusions.compile:
        compile_layers(model)
    if arch.moe is not None:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        from models.moe import track_expert_load

        # megatron's aux-loss tracker is global and sized by the first model's layer count: start it afresh.
        get_moe_layer_wise_logging_tracker().clear()
        track_expert_load(model)
    return model
