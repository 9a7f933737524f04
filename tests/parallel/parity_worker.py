"""The parity matrix: several layouts trained for a few steps in ONE torchrun launch, each compared with a
single-process reference (plain torch: the same GPTModel at tp = 1, torch AdamW, global-norm clipping).

    reference(path)                      in a world of one (pytest): initial weights, per-step losses, final weights
    torchrun --nproc_per_node=N tests/parallel/parity_worker.py REF OUT LAYOUTS_JSON

Each layout starts from the reference's initial weights (sliced for TP, PP stages and virtual chunks), trains on
the same global batches, and reports its per-step losses and the largest relative difference of any final weight
from the reference's (max |w - w_ref| / max |w_ref| per tensor).
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


def build(tp: int = 1, sp: bool = False):
    from models.llama import build_model, resolve_arch

    return build_model(
        resolve_arch("llama3", "tiny", **ARCH), vocab_size=VOCAB, max_seq_length=SEQ, tp=tp, sp=sp
    )


def global_batch(step: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(BATCH, SEQ),
        "position_ids": torch.arange(SEQ).expand(BATCH, -1).contiguous(),
    }


def reference(path: str) -> None:
    """Single process, no engine: the numbers every layout must reproduce."""
    torch.manual_seed(0)
    model = build()
    init = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )
    losses, norms = [], []
    for step in range(STEPS):
        b = global_batch(step)
        opt.zero_grad()
        loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    final = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    torch.save({"init": init, "final": final, "losses": losses, "grad_norms": norms}, path)


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
            p.copy_(full_slice(name, p, full, offset))
    return model


def weight_error(modules: list, full: dict) -> float:
    """Largest relative difference of a local weight from its slice of the reference (all ranks)."""
    import contextlib

    worst = 0.0
    for m in modules:
        offset = layer_offset(m)
        params = list(m.named_parameters())
        gather = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for _, p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in params])
        with gather, torch.no_grad():
            for name, p in params:
                ref = full_slice(name, p, full, offset)
                err = ((p.float() - ref).abs().max() / ref.abs().max()).item()
                if os.environ.get("PARITY_DETAIL") and err > 1e-5:
                    d = (p.float() - ref).abs()
                    i = d.argmax()
                    print(
                        f"  {name}: rel {err:.2e} at {i.item()} value {p.flatten()[i].item():.6g} ref {ref.flatten()[i].item():.6g} max|ref| {ref.abs().max().item():.3g} n>1e-6: {(d > 1e-6).sum().item()}",
                        flush=True,
                    )
                worst = max(worst, err)
    t = torch.tensor(worst)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# --------------------------------------------------------------------------------- one layout
def run_layout(spec: dict, ref: dict) -> dict:
    from megatron.core import parallel_state as ps

    from parallel import engine as groups
    from parallel.engines import OptimSettings, build_engine
    from parallel.layout import ParallelLayout
    from train.schedule import build_scheduler

    layout = ParallelLayout(nproc_per_node=dist.get_world_size(), micro_batch=MICRO, **spec)
    groups.init_model_parallel(layout, seed=1234, device=torch.device("cpu"))
    accum = layout.accum_steps(BATCH)
    engine = build_engine(
        layout,
        build_model=lambda: load_full(build(tp=layout.tp, sp=layout.sp), ref["init"]),
        optim=OptimSettings(lr=LR, min_lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8, clip_grad=CLIP),
        device=torch.device("cpu"),
        dtype=torch.float32,
        grad_accum=accum,
    )
    scheduler = build_scheduler(
        engine, peak_lr=LR, min_lr=LR, tokens=10**9, warmup_tokens=0, schedule="constant", weight_decay=WD
    )
    dp_rank, per_rank = ps.get_data_parallel_rank(), BATCH // layout.dp_size
    losses, norms = [], []
    for step in range(STEPS):
        b = global_batch(step)
        mine = {k: v[dp_rank * per_rank : (dp_rank + 1) * per_rank] for k, v in b.items()}
        micro = [{k: v[i : i + MICRO] for k, v in mine.items()} for i in range(0, per_rank, MICRO)]
        engine.zero_grad()
        losses.append(engine.forward_backward(micro, seq_length=SEQ))
        norms.append(engine.step())
        scheduler.step(increment=1)
    out = {"losses": losses, "grad_norms": norms, "weight_error": weight_error(engine.modules, ref["final"])}
    del engine
    ps.destroy_model_parallel()
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    ref_path, out_path, specs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    ref = torch.load(ref_path)
    results = {}
    for name, spec in specs.items():
        try:
            results[name] = run_layout(spec, ref)
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
