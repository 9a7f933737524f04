"""A plan as a Hydra config `python -m train +generated=<name>` (and `python -m slurm`) accept as-is.

The config overrides only schema fields that exist: a layout or model feature the run's schema does not have yet
(e.g. expert parallelism before `parallel.layout` grows an `ep` field) makes that candidate not writable, and the
planner writes the fastest candidate that is. Field names are looked up on the schema dataclasses, so the writer
follows the schema as it grows.
"""

from __future__ import annotations

import dataclasses
import os

from omegaconf import OmegaConf

from parallel.layout import ParallelLayout
from parallel.plan.flops import PlanArch
from parallel.plan.memory import Layout
from train.errors import ConfigError

# Planner field -> names the run schema may give it (first match wins).
_OPTIONAL_LAYOUT = {
    "ep": ("ep", "expert_parallel"),
    "cp": ("cp", "context_parallel"),
    "vpp": ("vpp", "virtual_pp"),
    "recompute": ("recompute", "recompute_granularity"),
}
_DEFAULTS = {"ep": 1, "cp": 1, "vpp": 1, "recompute": "none"}
_MOE_MODEL = {
    "num_experts": ("num_experts", "moe_num_experts"),
    "top_k": ("moe_top_k", "top_k", "moe_router_topk"),
    "moe_ffn_hidden_size": ("moe_ffn_hidden_size", "expert_ffn_hidden_size"),
}


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def parallel_fields(layout: Layout, *, gpus_per_node: int, nodes: int) -> tuple[dict, str | None]:
    """The `parallel` group's values for `layout`, and why the run's schema cannot take it (None if it can)."""
    names = _names(ParallelLayout)
    out: dict = {
        "nproc_per_node": gpus_per_node,
        "nnodes": nodes,
        "tp": layout.tp,
        "sp": layout.sp,
        "pp": layout.pp,
        "dp": layout.dp,
        "micro_batch": layout.micro_batch,
        "engine": layout.engine,
    }
    key = next((n for n in ("zero_stage", "zero") if n in names), None)
    if key is not None:
        out[key] = layout.zero
    elif layout.engine == "megatron" and "distributed_optimizer" in names:
        out["distributed_optimizer"] = layout.zero == 1
    else:
        return out, "parallel.layout has no ZeRO stage field"
    if "etp" in names:
        out["etp"] = 1  # the planner keeps experts unsplit by TP
    for attr, options in _OPTIONAL_LAYOUT.items():
        value = getattr(layout, attr)
        key = next((n for n in options if n in names), None)
        if key is not None:
            out[key] = value
        elif value != _DEFAULTS[attr]:
            return out, f"parallel.layout has no {attr} field ({attr}={value})"
    out = {k: v for k, v in out.items() if k in names}
    try:
        ParallelLayout(**out)
    except ConfigError as e:
        return out, str(e)
    return out, None


def model_fields(arch: PlanArch, *, seq_length: int) -> tuple[dict, str | None]:
    """The `model` group's values: the llama3 family with every shape field overridden."""
    from train.config import ModelConfig

    names = _names(ModelConfig)
    out: dict = {
        "family": "llama3",
        "size": "tiny",
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_kv_heads": arch.num_kv_heads,
        "ffn_hidden_size": arch.ffn_hidden_size,
        # Llama 3's RoPE base at >= 8k contexts (Dubey et al. 2024, Sec. 3.2), the classic 10k below.
        "rope_theta": 500_000.0 if seq_length >= 8192 else 10_000.0,
        "tie_embeddings": arch.tie_embeddings,
    }
    if arch.is_mla:
        return out, "the planner writes GQA shapes only"
    if arch.is_moe:
        moe = {"num_experts": arch.num_experts, "top_k": arch.top_k, "ffn_hidden_size": arch.expert_ffn}
        if "extra" in names:  # models.arch.Arch.moe, given as a dict of its fields
            out["extra"] = {"moe": moe}
        else:
            for attr, options in _MOE_MODEL.items():
                key = next((n for n in options if n in names), None)
                if key is None:
                    return out, f"model schema has no MoE field for {attr}"
                out[key] = getattr(arch, attr) if attr != "moe_ffn_hidden_size" else arch.expert_ffn
    try:
        ModelConfig(**out)
    except (ConfigError, TypeError) as e:
        return out, str(e)
    return out, None


def prediction(candidate) -> dict[str, float]:
    """The metrics a candidate (`parallel.plan.search.Candidate`) predicts, under the metric keys of
    train/metrics.py: step time, tokens/s, MFU, and memory per GPU (GiB, as torch reports it). The generated
    config carries them as `logging.predicted`; the run report draws them against the measured values."""
    return {
        "time/step": candidate.time.total,
        "tokens_per_s": candidate.tokens_per_s,
        "tokens_per_s_per_gpu": candidate.tokens_per_s / candidate.layout.world,
        "mfu": candidate.time.mfu,
        "mem/peak_allocated_gb": candidate.memory.total / 2**30,
    }


def writable(plan, candidate) -> str | None:
    """Why `candidate` of `plan` cannot be written as a run config (None when it can)."""
    _, why = parallel_fields(candidate.layout, gpus_per_node=plan.world // plan.nodes, nodes=plan.nodes)
    if why is None:
        _, why = model_fields(plan.arch, seq_length=plan.request.seq_length)
    return why


def generated_yaml(plan, candidate, hp, *, configs_dir: str = "configs") -> str:
    """The text of configs/generated/<name>.yaml for `candidate` with hyperparameters `hp`."""
    from parallel.plan.planner import tokens_str

    req = plan.request
    par, why = parallel_fields(candidate.layout, gpus_per_node=plan.world // plan.nodes, nodes=plan.nodes)
    model, why_model = model_fields(plan.arch, seq_length=req.seq_length)
    if why or why_model:
        raise ConfigError(
            "plan.layout", candidate.layout, f"cannot be written as a run config: {why or why_model}"
        )
    base = {
        "tokens": hp.tokens,
        "seq_length": req.seq_length,
        "batch_tokens": hp.batch_tokens,
        "lr": float(f"{hp.lr:.4g}"),
        "min_lr": float(f"{hp.min_lr:.4g}"),
        "warmup_tokens": hp.warmup_tokens,
        "schedule": hp.schedule,
    }
    if hp.schedule == "wsd":
        base |= {"decay_tokens": hp.decay_tokens, "decay_style": hp.decay_style}
    body: dict = {
        "model": model,
        "parallel": par,
        "recipe": {"name": req.name, "stages": {"base": base}},
        "logging": {"predicted": {k: float(f"{v:.4g}") for k, v in prediction(candidate).items()}},
    }
    if 256 < req.vocab_size <= 65_000:  # the tokenizer Kiln trains (uint16 token files)
        body["data"] = {"tokenizer": {"vocab_size": req.vocab_size}}
    defaults: list = []
    if os.path.exists(os.path.join(configs_dir, "cluster", f"{plan.cluster_name}.yaml")):
        defaults.append({"override /cluster": plan.cluster_name})
    defaults += [{"override /recipe": "plan_base"}, "_self_"]
    head = [
        "# @package _global_",
        f"# Generated by `python -m parallel.plan` ({req.name}): {plan.flops:.3g} FLOPs, "
        f"{tokens_str(plan.params.total)} parameters on {tokens_str(hp.tokens)} tokens,",
        f"# {plan.nodes} node(s) x {plan.world // plan.nodes} {plan.gpu}; predicted "
        f"{candidate.memory.total / 1e9:.1f} GB/GPU, {candidate.time.total:.3g} s/step, MFU {candidate.time.mfu:.1%}.",
        f"# Use: python -m train +generated={req.name}",
    ]
    text = OmegaConf.to_yaml(OmegaConf.create({"defaults": defaults, **body}), sort_keys=False)
    return "\n".join(head) + "\n" + text


def write(plan, candidate, hp, *, out_dir: str, configs_dir: str = "configs") -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{plan.request.name}.yaml")
    with open(path, "w") as f:
        f.write(generated_yaml(plan, candidate, hp, configs_dir=configs_dir))
    return path
