"""Step time, throughput, memory and communication of each parallel layout, on the same model and global batch.

    python bench/parallel.py [--nproc 2] [--steps 4] [--layouts dp2,tp2,...]

Starts torchrun itself (gloo on CPU, NCCL on GPU) and trains each layout for 1 warm-up step plus `--steps`
timed steps in one launch. Per layout it prints: median step time, tokens/s and its ratio to the first layout,
the largest resident-memory growth of any rank while the layout trains (CPU: RSS sampled after each step; GPU:
torch's peak allocated), and the bytes each rank hands to collectives and p2p per step (counted by wrapping
torch.distributed before megatron-core or DeepSpeed import it, so both engines are counted the same way; an
all-reduce counts its input once, whatever algorithm the backend runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = {
    "dp2 (ddp)": {"zero_stage": 0},
    "dp2 + distributed optimizer": {"zero_stage": 1},
    "dp2 + full recompute": {"recompute": "full"},
    "tp2": {"tp": 2},
    "tp2 + sp": {"tp": 2, "sp": True},
    "tp2 + sp + selective recompute": {"tp": 2, "sp": True, "recompute": "selective"},
    "pp2 (1F1B)": {"pp": 2},
    "pp2 + vpp2": {"pp": 2, "vpp": 2},
    "cp2 (all-gather K/V)": {"cp": 2},
    "deepspeed zero-1": {"engine": "deepspeed", "zero_stage": 1},
    "deepspeed zero-2": {"engine": "deepspeed", "zero_stage": 2},
    "deepspeed zero-3": {"engine": "deepspeed", "zero_stage": 3},
    "deepspeed zero-3 + offload": {"engine": "deepspeed", "zero_stage": 3, "offload": "optimizer+param"},
}
ARCH = {
    "num_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_kv_heads": 2,
    "ffn_hidden_size": 704,
}
VOCAB, SEQ, BATCH, MICRO = 1024, 256, 16, 2

_COUNTED = {
    "all_reduce": 0,
    "reduce_scatter_tensor": 1,
    "_reduce_scatter_base": 1,
    "all_gather_into_tensor": 1,
    "_all_gather_base": 1,
    "all_gather": 1,
    "reduce_scatter": 1,
    "broadcast": 0,
    "reduce": 0,
    "send": 0,
    "isend": 0,
    "all_to_all_single": 1,
}
comm_bytes = [0]


def _nbytes(x) -> int:
    import torch

    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def count_communication() -> None:
    """Wrap torch.distributed's collectives and sends so each rank's payload bytes add up in comm_bytes."""
    import torch.distributed as dist

    for name, arg in _COUNTED.items():
        real = getattr(dist, name)

        def counted(*args, _real=real, _arg=arg, **kwargs):
            payload = args[_arg] if len(args) > _arg else next(iter(kwargs.values()), None)
            comm_bytes[0] += _nbytes(payload)
            return _real(*args, **kwargs)

        setattr(dist, name, functools.wraps(real)(counted))
    real_batch = dist.batch_isend_irecv

    def batch_isend_irecv(ops):
        comm_bytes[0] += sum(_nbytes(op.tensor) for op in ops if op.op in (dist.isend, dist.send))
        return real_batch(ops)

    dist.batch_isend_irecv = batch_isend_irecv


def resident_bytes(device) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def bench_layout(spec: dict, *, steps: int, device) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from models.gpt import build_model
    from models.registry import resolve_arch
    from parallel import engine as groups
    from parallel.engines import OptimSettings, build_engine
    from parallel.layout import ParallelLayout

    layout = ParallelLayout(nproc_per_node=dist.get_world_size(), micro_batch=MICRO, **spec)
    groups.init_model_parallel(layout, seed=1234, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = resident_bytes(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = resolve_arch("llama3", "tiny", **ARCH)
    engine = build_engine(
        layout,
        build_model=lambda **kw: build_model(
            arch, vocab_size=VOCAB, max_seq_length=SEQ, tp=layout.tp, sp=layout.sp, dtype=dtype, **kw
        ),
        optim=OptimSettings(
            lr=1e-3, min_lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0
        ),
        device=device,
        dtype=dtype,
        grad_accum=layout.accum_steps(BATCH),
    )
    per_rank = BATCH // layout.dp_size
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    times, volumes, peak = [], [], base
    for step in range(steps + 1):
        tokens = torch.randint(0, VOCAB, (per_rank, SEQ + 1), generator=gen)
        micro = [
            {
                "tokens": tokens[i : i + MICRO, :-1],
                "labels": tokens[i : i + MICRO, 1:],
                "loss_mask": torch.ones(MICRO, SEQ),
                "position_ids": torch.arange(SEQ).expand(MICRO, -1),
            }
            for i in range(0, per_rank, MICRO)
        ]
        dist.barrier()
        comm_bytes[0] = 0
        t0 = time.perf_counter()
        engine.zero_grad()
        engine.forward_backward(micro, seq_length=SEQ)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
            volumes.append(comm_bytes[0])
        peak = max(peak, resident_bytes(device))
    stats = torch.tensor(
        [statistics.median(times), peak - base, statistics.mean(volumes)], dtype=torch.float64
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    del engine
    ps.destroy_model_parallel()
    return {"step_s": stats[0].item(), "memory_bytes": stats[1].item(), "comm_bytes": stats[2].item()}


def worker(args) -> None:
    warnings.filterwarnings("ignore")
    count_communication()  # before megatron-core imports (it keeps references to some collectives)
    import torch
    import torch.distributed as dist

    from parallel.engine import init_distributed, pick_device

    device = pick_device("auto")
    init_distributed(device)
    results = {}
    for name in args.layouts.split(","):
        results[name] = bench_layout(LAYOUTS[name], steps=args.steps, device=device)
    if dist.get_rank() == 0:
        tokens = BATCH * SEQ
        first = next(iter(results.values()))["step_s"]
        where = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"CPU, gloo, {dist.get_world_size()} procs"
        )
        print(
            f"\nllama {ARCH}, vocab {VOCAB}, global batch {BATCH}x{SEQ} tokens, micro-batch {MICRO}; {where}"
        )
        print(
            "| layout | step s | tokens/s | vs first | memory growth MiB (max rank) | comm MiB/step/rank (max) |"
        )
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| {name} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | {first / r['step_s']:.2f} | "
                f"{r['memory_bytes'] / 2**20:,.0f} | {r['comm_bytes'] / 2**20:,.2f} |"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += [os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
