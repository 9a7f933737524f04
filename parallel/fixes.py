"""Source-level fixes of megatron-core bugs (applied on every device), and the helper that applies them."""

from __future__ import annotations

import inspect
import textwrap


def rewrite_source(module, qualname: str, replacements: list[tuple[str, str]]) -> None:
    """Recompile `module.qualname` with textual replacements; raise if a pattern is gone (the shim
    would silently stop applying after an upgrade)."""
    owner, attr = module, qualname
    if "." in qualname:
        cls_name, attr = qualname.split(".")
        owner = getattr(module, cls_name)
    fn = owner.__dict__[attr]
    src = textwrap.dedent(inspect.getsource(fn))
    for old, new in replacements:
        if old not in src:
            raise RuntimeError(f"patch of {module.__name__}.{qualname}: pattern {old!r} not found")
        src = src.replace(old, new)
    namespace: dict = {}
    exec(compile(src, f"<kiln patch {module.__name__}.{qualname}>", "exec"), module.__dict__, namespace)
    setattr(owner, attr, namespace[fn.__name__])


_fixed = False


def apply_megatron_fixes() -> None:
    """Fixes for megatron-core 0.16 bugs that give wrong numbers on any device (ENGINES-CPU.md, case 3):
    resuming the distributed optimizer from a `fully_reshardable` checkpoint raises KeyError 'step'
    (the saved tensors hold no 'step'), and then every param's state shares ONE `step` tensor that
    torch Adam increments once per param per step, so the resumed loss drifts."""
    global _fixed
    if _fixed:
        return
    import megatron.core.optimizer.distrib_optimizer as DO

    rewrite_source(
        DO,
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        [("for key in dst_tensors:", "for key in [k_ for k_ in dst_tensors if k_ in tensors]:")],
    )
    rewrite_source(
        DO, "DistributedOptimizer.load_state_dict", [('s["step"] = step\n', 's["step"] = step.clone()\n')]
    )
    _fixed = True


_mla_fixed = False


def fix_mla_kpos_grad() -> None:
    """megatron-core 0.16 MLA at TP>1 gives WRONG grads without error (ENGINES-CPU.md, case 2): the shared
    positional key `k_pos_emb` is cut from the TP-gathered `kv_down_proj` output and used by every rank's heads, but
    its grad is never summed across TP ranks, so the rope rows of `linear_kv_down_proj` learn from 1/TP of the heads.
    Routing it through `copy_to_tensor_model_parallel_region` (identity forward, all-reduce backward) sums them."""
    global _mla_fixed
    if _mla_fixed:
        return
    import megatron.core.transformer.multi_latent_attention as MLA
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    MLA.copy_to_tensor_model_parallel_region = copy_to_tensor_model_parallel_region
    # The source is dedented by one level (the method's class indentation) before matching.
    old = (
        "        kv_compressed, k_pos_emb = torch.split(\n"
        "            kv_combined, [self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim], dim=-1\n"
        "        )\n"
        "        if self.config.sequence_parallel:\n"
    )
    new = old.replace(
        "        if self.config.sequence_parallel:\n",
        "        k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb)\n"
        "        if self.config.sequence_parallel:\n",
    )
    rewrite_source(MLA, "MLASelfAttention.get_query_key_value_tensors", [(old, new)])
    _mla_fixed = True


def fix_moe_mla_without_te() -> list[str]:
    """Without TransformerEngine (CPU, or a GPU build without it) megatron-core 0.16 breaks in two places
    (ENGINES-CPU.md `moe_te_names`, `mla_no_te`): the MoE router reads `te_general_gemm`, defined only when TE
    imports (NameError), and MLA's module believes TE exists (its TE names are MagicMock placeholders, so
    `isinstance(x, TELinear)` raises TypeError). Returns the names fixed; none when TE is installed."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return []
    import megatron.core.transformer.moe.moe_utils as MU
    import megatron.core.transformer.multi_latent_attention as MLA

    fixed = []
    if "te_general_gemm" not in vars(MU):
        MU.te_general_gemm = None
        fixed.append("moe_te_names")
    if MLA.HAVE_TE:
        MLA.HAVE_TE = False
        MLA.TEColumnParallelLinear = MLA.TELinear = MLA.Linear = MLA.set_save_original_input = None
        fixed.append("mla_no_te")
    return fixed


_rope_fixed = False


def skip_empty_rope_concat() -> None:
    """Speed, same numbers: megatron-core's RoPE ends with `cat((t, t_pass))` even when RoPE covers the whole head
    (`t_pass` empty), a full copy of every query and key tensor in forward and backward. Return `t` then."""
    global _rope_fixed
    if _rope_fixed:
        return
    import megatron.core.models.common.embeddings.rope_utils as R

    rewrite_source(
        R,
        "_apply_rotary_pos_emb_bshd",
        [
            (
                "    return torch.cat((t, t_pass), dim=-1)",
                "    return t if t_pass.shape[-1] == 0 else torch.cat((t, t_pass), dim=-1)",
            )
        ],
    )
    _rope_fixed = True
