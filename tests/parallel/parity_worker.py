"""The parity matrix: several layouts trained for a few steps in ONE torchrun launch, each compared with a
single-process reference (plain torch: the same GPTModel at tp = 1, torch AdamW, global-norm clipping).

    reference(path)                      in a world of one (pytest): initial weights, per-step losses, final weights
    torchrun --nproc_per_node=N tests/parallel/parity_worker.py REF OUT LAYOUTS_JSON

Each layout starts from the reference's initial weights (sliced for TP, PP stages and virtual chunks), trains on
the same global batches, and reports its per-step losses and the largest relative difference of any final weight
from the reference's (||w - w_ref|| / ||w_ref|| per tensor, and the largest elementwise difference).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

VOCAB, SEQ, BATCH, MICRO, STEPS = 256, 32, 8, 2, 5
LR, WD, CLIP = 3e-3, 0.1, 1.0
ARCH = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 128,
}


EXPERTS = 4
VARIANTS = {
    # The core-attention features context parallelism has to carry through its chunked masks: MQA (one kv
    # head), a sliding window shorter than the sequence and attention-logit soft-capping (the unfused path).
    "mqa_window_softcap": {"num_kv_heads": 1, "sliding_window": 12, "attn_softcap": 5.0},
    # Multi-head latent attention (DeepSeek-V2, dense MLP): megatron-core slices its decoupled RoPE for CP itself.
    "mla": {
        "family": "deepseek_v2",
        "num_kv_heads": 4,
        "moe": None,
        "mla": {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
    },
}


def build(tp: int = 1, sp: bool = False, moe: bool = False, variant: str | None = None, **engine_kwargs):
    """The parity model (models.gpt.build_model); `moe`: the same with 4 experts, top-2, no load-balancing loss
    (its value would depend on how tokens are split across ranks); `variant`: ARCH with a VARIANTS entry's
    changes. `engine_kwargs` come from the engine."""
    from models.gpt import build_model
    from models.registry import resolve_arch

    overrides = dict(ARCH) | VARIANTS.get(variant or "", {})
    family = overrides.pop("family", "mixtral" if moe else "llama3")
    if moe:
        experts = {"num_experts": EXPERTS, "top_k": 2, "ffn_hidden_size": ARCH["ffn_hidden_size"] // 2}
        overrides["moe"] = {**experts, "aux_loss_coeff": 0.0}
    arch = resolve_arch(family, "tiny", **overrides)
    return build_model(arch, vocab_size=VOCAB, max_seq_length=SEQ, tp=tp, sp=sp, **engine_kwargs)


def global_batch(step: int, *, masked: bool = False) -> dict[str, torch.Tensor]:
    """`masked`: a loss mask with holes (the tail of every other sequence, the head of every fourth), so that
    ranks holding different parts of a sequence (CP) count different numbers of tokens."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    mask = torch.ones(BATCH, SEQ)
    if masked:
        mask[::2, 5 * SEQ // 8 :] = 0
        mask[1::4, : SEQ // 8] = 0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(SEQ).expand(BATCH, -1).contiguous(),
    }


def reference(path: str, *, moe: bool = False, variant: str | None = None, masked: bool = False) -> None:
    """Single process, no engine: the numbers every layout must reproduce."""
    torch.manual_seed(0)
    model = build(moe=moe, variant=variant)
    init = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )
    losses, norms, steps = [], [], []
    for step in range(STEPS):
        b = global_batch(step, masked=masked)
        opt.zero_grad()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float()
        if masked:
            # megatron-core's schedule: each micro-batch's token mean, averaged over micro-batches (and DP
            # ranks); the reported loss is the token mean of the whole batch.
            m = b["loss_mask"]
            means = [
                (per_token[i : i + MICRO] * m[i : i + MICRO]).sum() / m[i : i + MICRO].sum()
                for i in range(0, BATCH, MICRO)
            ]
            torch.stack(means).mean().backward()
            loss = (per_token * m).sum() / m.sum()
        else:
            loss = per_token.mean()
            loss.backward()
        steps.append({"weights": before, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    final = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    # + the weights before each step and that step's gradients (before clipping), for run_stepwise
    torch.save({"init": init, "final": final, "losses": losses, "grad_norms": norms, "steps": steps}, path)


# --------------------------------------------------------------------------------- slicing full tensors
def layer_offset(model) -> int:
    """Global index of the first decoder layer of a model chunk."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers is not None and len(layers) else 0


def full_slice(name: str, p: torch.Tensor, full: dict, offset: int, experts: int = 0) -> torch.Tensor:
    """The part of a full (tp = pp = ep = 1) tensor that local parameter `p` holds, from megatron-core's
    per-parameter attributes (tensor_model_parallel, partition_dim, partition_stride)."""
    from megatron.core import parallel_state as ps

    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        parts[i] = str(int(parts[i]) + offset)
    expert = "local_experts" in parts
    if expert:
        i = parts.index("local_experts") + 1
        local = experts // ps.get_expert_model_parallel_world_size()
        parts[i] = str(ps.get_expert_model_parallel_rank() * local + int(parts[i]))
    t = full[".".join(parts)]
    if getattr(p, "tensor_model_parallel", False):
        if expert:
            r, w = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
        else:
            r, w = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        dim, stride = p.partition_dim, p.partition_stride
        chunks = torch.split(t, t.shape[dim] // w // stride, dim=dim)
        t = torch.cat(chunks[r::w], dim=dim)
    if t.shape != p.shape:
        raise AssertionError(f"{name}: full slice {tuple(t.shape)} vs local {tuple(p.shape)}")
    return t


def load_full(model, full: dict):
    offset = layer_offset(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full_slice(name, p, full, offset, EXPERTS))
    return model


def weight_error(modules: list, full: dict) -> tuple[float, float, float]:
    """Over every local weight (all ranks): the largest relative error ||w - w_ref|| / ||w_ref|| of a tensor
    (its slice), the largest elementwise |w - w_ref|, and the largest fraction of a tensor's elements off by
    more than 1e-6 (a real error, e.g. a missing all-reduce, moves nearly all elements of the tensors it hits;
    Adam's amplification of last-bit gradient differences moves isolated ones)."""
    import contextlib

    worst_rel, worst_abs, worst_frac = 0.0, 0.0, 0.0
    for m in modules:
        offset = layer_offset(m)
        params = list(m.named_parameters())
        gather = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for _, p in params):  # ZeRO-3: parameters are partitioned
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in params])
        with gather, torch.no_grad():
            for name, p in params:
                ref = full_slice(name, p, full, offset, EXPERTS)
                diff = p.float() - ref
                worst_rel = max(worst_rel, (diff.norm() / ref.norm()).item())
                if os.environ.get("PARITY_DETAIL") and (diff.norm() / ref.norm()).item() > 1e-5:
                    print(
                        f"  {name}: rel {(diff.norm() / ref.norm()).item():.2e} max {diff.abs().max().item():.2e} "
                        f"n>1e-6 {(diff.abs() > 1e-6).sum().item()} of {diff.numel()}",
                        flush=True,
                    )
                worst_abs = max(worst_abs, diff.abs().max().item())
                worst_frac = max(worst_frac, (diff.abs() > 1e-6).float().mean().item())
    t = torch.tensor([worst_rel, worst_abs, worst_frac])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item(), t[1].item(), t[2].item()


# --------------------------------------------------------------------------------- one layout
def run_layout(spec: dict, ref: dict, *, scratch: str) -> dict:
    """Train `spec` for STEPS steps. With "resume_at": k, the engine is saved after step k through
    train/checkpoint.py, thrown away, and a fresh one loads the checkpoint and goes on; with "resume_as": {...}
    too, the fresh one has that other layout (megatron: dist_checkpointing reshards)."""
    from megatron.core import parallel_state as ps

    from parallel import engine as groups
    from parallel.engines import OptimSettings, build_engine
    from parallel.layout import ParallelLayout
    from train import checkpoint
    from train.schedule import build_scheduler

    spec = dict(spec)
    resume_at = spec.pop("resume_at", None)
    resume_as = spec.pop("resume_as", spec)
    moe = spec.pop("moe", False)
    variant = spec.pop("variant", None)
    masked = spec.pop("masked", False)
    layout = ParallelLayout(nproc_per_node=dist.get_world_size(), micro_batch=MICRO, **spec)
    groups.init_model_parallel(layout, seed=1234, device=torch.device("cpu"))

    def fresh(init: dict):
        engine = build_engine(
            layout,
            build_model=lambda **kw: load_full(
                build(tp=layout.tp, sp=layout.sp, moe=moe, variant=variant, **kw), init
            ),
            optim=OptimSettings(
                lr=LR, min_lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8, clip_grad=CLIP
            ),
            device=torch.device("cpu"),
            dtype=torch.float32,
            grad_accum=layout.accum_steps(BATCH),
        )
        scheduler = build_scheduler(
            engine, peak_lr=LR, min_lr=LR, tokens=10**9, warmup_tokens=0, schedule="constant", weight_decay=WD
        )
        return engine, scheduler

    engine, scheduler = fresh(ref["init"])
    dp_rank, per_rank = ps.get_data_parallel_rank(), BATCH // layout.dp_size
    losses, norms = [], []
    for step in range(STEPS):
        if step == resume_at:
            path = checkpoint.save(scratch, engine=engine, scheduler=scheduler, state={"step": step})
            del engine
            if resume_as is not spec:
                ps.destroy_model_parallel()
                layout = ParallelLayout(nproc_per_node=dist.get_world_size(), micro_batch=MICRO, **resume_as)
                groups.init_model_parallel(layout, seed=1234, device=torch.device("cpu"))
                dp_rank, per_rank = ps.get_data_parallel_rank(), BATCH // layout.dp_size
            # Different weights before loading, so a load that does nothing cannot pass.
            engine, scheduler = fresh({k: torch.zeros_like(v) for k, v in ref["init"].items()})
            assert checkpoint.load(path, engine=engine, scheduler=scheduler, full_verify=True)["step"] == step
        b = global_batch(step, masked=masked)
        mine = {k: v[dp_rank * per_rank : (dp_rank + 1) * per_rank] for k, v in b.items()}
        micro = [{k: v[i : i + MICRO] for k, v in mine.items()} for i in range(0, per_rank, MICRO)]
        engine.zero_grad()
        losses.append(engine.forward_backward(micro, seq_length=SEQ))
        norms.append(engine.step())
        scheduler.step(increment=1)
    rel, max_abs, frac = weight_error(engine.modules, ref["final"])
    out = {
        "losses": losses,
        "grad_norms": norms,
        "weight_rel": rel,
        "weight_max_abs": max_abs,
        "weight_frac": frac,
    }
    sizes = engine.state_bytes()
    for key in ("params", "grads", "optimizer"):  # the largest rank's bytes
        if sizes[key] is not None:
            t = torch.tensor(float(sizes[key]))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[f"{key}_bytes"] = t.item()
    del engine
    ps.destroy_model_parallel()
    return out


def run_stepwise(spec: dict, ref: dict) -> dict:
    """Gradients without the optimizer in the way: before each step the engine's weights are set to the
    reference's, and this step's gradient (summed over dp x cp by DDP) must be the reference's. Adam's
    amplification of last-bit differences (see test_parity.py) cannot hide or fake an error here. ZeRO-0, so
    every rank's gradient buffer holds the whole reduced gradient."""
    from megatron.core import parallel_state as ps

    from parallel import engine as groups
    from parallel.engines import OptimSettings, build_engine
    from parallel.layout import ParallelLayout

    masked, variant = spec.get("masked", False), spec.get("variant")
    spec = {k: v for k, v in spec.items() if k not in ("stepwise", "masked", "variant")}
    layout = ParallelLayout(nproc_per_node=dist.get_world_size(), micro_batch=MICRO, zero_stage=0, **spec)
    groups.init_model_parallel(layout, seed=1234, device=torch.device("cpu"))
    engine = build_engine(
        layout,
        build_model=lambda **kw: load_full(
            build(tp=layout.tp, sp=layout.sp, variant=variant, **kw), ref["init"]
        ),
        optim=OptimSettings(lr=LR, min_lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8, clip_grad=CLIP),
        device=torch.device("cpu"),
        dtype=torch.float32,
        grad_accum=layout.accum_steps(BATCH),
    )
    dp_rank, per_rank = ps.get_data_parallel_rank(), BATCH // layout.dp_size
    worst = []
    for step, record in enumerate(ref["steps"]):
        for m in engine.modules:
            load_full(m, record["weights"])
        b = global_batch(step, masked=masked)
        mine = {k: v[dp_rank * per_rank : (dp_rank + 1) * per_rank] for k, v in b.items()}
        engine.zero_grad()
        engine.forward_backward(
            [{k: v[i : i + MICRO] for k, v in mine.items()} for i in range(0, per_rank, MICRO)],
            seq_length=SEQ,
        )
        err = 0.0
        for m in engine.modules:
            offset = layer_offset(m)
            for name, p in m.named_parameters():
                want = full_slice(name, p, record["grads"], offset, EXPERTS)
                err = max(err, ((p.main_grad - want).norm() / want.norm()).item())
        t = torch.tensor(err)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        worst.append(t.item())
    del engine
    ps.destroy_model_parallel()
    return {"grad_rel": worst}


def moe_reference(path: str) -> str:
    return os.path.splitext(path)[0] + ".moe.pt"


def reference_of(path: str, spec: dict) -> str:
    """The reference file a layout compares with: <REF>.moe.pt for MoE, <REF>.<variant>.pt for a variant,
    <REF>.masked.pt for the batches with loss-mask holes."""
    if spec.get("moe"):
        return moe_reference(path)
    if spec.get("variant"):
        return f"{os.path.splitext(path)[0]}.{spec['variant']}.pt"
    if spec.get("masked"):
        return f"{os.path.splitext(path)[0]}.masked.pt"
    return path


def main() -> None:
    warnings.filterwarnings("ignore")
    ref_path, out_path, specs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # MoE layouts ("moe": true) compare with the MoE reference, saved beside the dense one as <REF>.moe.pt;
    # "variant" layouts with <REF>.<variant>.pt; "masked" ones with <REF>.masked.pt ("stepwise": run_stepwise).
    dist.init_process_group("gloo")
    results = {}
    for i, (name, spec) in enumerate(specs.items()):
        try:
            ref = torch.load(reference_of(ref_path, spec))
            if spec.get("stepwise"):
                results[name] = run_stepwise(spec, ref)
            else:
                scratch = os.path.join(os.path.dirname(out_path), f"ckpt{i}")
                results[name] = run_layout(spec, ref, scratch=scratch)
        except Exception as e:  # one broken layout must not hide the others' numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        if dist.get_rank() == 0:
            print(f"parity {name}: {results[name]}", flush=True)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
