"""Training throughput of Kiln against references on the same model, batch, sequence and precision, in one process.

    python bench/train_throughput.py [--seq 256,1024] [--batch-tokens 4096] [--steps 6] [--warmup 2]
                                     [--size tiny] [--profile DIR --profile-steps 3]

Implementations (each a full training step: zero grads, forward, backward, clip to 1.0, AdamW):
  kiln          models.gpt.build_model + the megatron engine the training loop uses (parallel/engines/megatron.py;
                its DDP wrapper and megatron-core optimizer), as a world of one (configs/parallel/single.yaml),
                with the fused kernels `model.fusion` auto picks on this device (models/fusions.py)
  kiln-plain    the same, every fusion off (the reference path)
  kiln-fused    the same, fused RMSNorm, SwiGLU and cross-entropy on (no compile)
  kiln-compiled kiln-fused + torch.compile on each transformer layer
  transformers  transformers' LlamaForCausalLM, attn_implementation="sdpa", torch.optim.AdamW
  plain         bench/plain_gpt.py, a single-file PyTorch GPT, torch.optim.AdamW
The model is llama3 `--size` (a size of models/llama.py; tiny by default), fp32 on CPU and bf16 on GPU. After warm-up the
implementations take turns step by step (so load from other processes hits them alike), and the table reports
the median step (and the fastest, the one least disturbed by other load): tokens/s, model TFLOP/s and MFU (parallel/plan/flops.py, megatron convention; the CPU peak is the
planner's nominal 0.1 TFLOP/s), memory, and the ratio of tokens/s to `transformers`. Memory on GPU is torch's peak
allocated during that implementation's steps; on CPU the growth of resident memory while it was built and warmed
up (built one after another, so later rows reuse freed pages: read it as an upper bound for the first row only).
`--profile DIR` writes a torch profiler trace (chrome JSON) of Kiln's steps and prints the top operators.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMPLS = ("kiln", "transformers", "plain")
KILN_VARIANTS = {  # impl name -> model.fusion settings (models/fusions.py)
    "kiln": {},
    "kiln-plain": dict(norm="false", activation="false", cross_entropy="false", compile="false"),
    "kiln-fused": dict(norm="true", activation="true", cross_entropy="true", compile="false"),
    "kiln-compiled": dict(norm="true", activation="true", cross_entropy="true", compile="true"),
}
LR, BETAS, EPS, WD, CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0


def memory_now(device) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def kiln_step(
    arch, *, vocab: int, seq: int, batch: int, device, dtype, attention: str, fusion: dict
) -> Callable:
    import torch
    from omegaconf import OmegaConf

    from models.fusions import resolve_fusions
    from models.gpt import build_model
    from parallel.engines import OptimSettings, build_engine
    from parallel.layout import ParallelLayout

    single = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "configs/parallel/single.yaml")))
    layout = ParallelLayout(**(single | {"micro_batch": batch}))  # the one-process layout a user runs
    engine = build_engine(
        layout,
        build_model=lambda **kw: build_model(
            arch,
            vocab_size=vocab,
            max_seq_length=seq,
            dtype=dtype,
            attention_backend=attention,
            fusions=resolve_fusions(device.type, **fusion),
            **kw,
        ),
        optim=OptimSettings(lr=LR, min_lr=LR, weight_decay=WD, betas=BETAS, eps=EPS, clip_grad=CLIP),
        device=device,
        dtype=dtype,
        grad_accum=1,
    )
    ones = torch.ones(batch, seq, device=device)
    positions = torch.arange(seq, device=device).expand(batch, -1)

    def step(tokens):
        engine.zero_grad()
        micro = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": ones,
            "position_ids": positions,
        }
        loss = engine.forward_backward([micro], seq_length=seq)
        engine.step()
        return loss

    return step


def torch_step(model, *, device, dtype, loss_of: Callable) -> Callable:
    import torch

    model = model.to(device=device, dtype=dtype).train()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return loss.item()

    return step


def transformers_step(arch, *, vocab: int, device, dtype) -> Callable:
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.hf import hf_config

    cfg = hf_config(arch, family="llama3", vocab_size=vocab)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    def loss_of(m, x, y):
        return F.cross_entropy(m(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

    return torch_step(model, device=device, dtype=dtype, loss_of=loss_of)


def plain_step(arch, *, vocab: int, device, dtype) -> Callable:
    from bench.plain_gpt import PlainGPT

    model = PlainGPT(
        vocab_size=vocab,
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_attention_heads,
        num_kv_heads=arch.num_kv_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        rope_theta=arch.rope_theta,
        eps=arch.norm_eps,
    )
    return torch_step(model, device=device, dtype=dtype, loss_of=lambda m, x, y: m.loss(x, y))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, seq: int, *, device, dtype) -> dict[str, dict]:
    """Build each implementation, warm it up, then run them in turns; per implementation: step times, memory."""
    import torch

    from models.registry import resolve_arch

    arch = resolve_arch("llama3", args.size)
    batch = max(1, args.batch_tokens // seq)
    builders = {
        name: functools.partial(
            kiln_step,
            arch,
            vocab=args.vocab,
            seq=seq,
            batch=batch,
            device=device,
            dtype=dtype,
            attention=args.attention,
            fusion=fusion,
        )
        for name, fusion in KILN_VARIANTS.items()
    } | {
        "transformers": lambda: transformers_step(arch, vocab=args.vocab, device=device, dtype=dtype),
        "plain": lambda: plain_step(arch, vocab=args.vocab, device=device, dtype=dtype),
    }
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, args.vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    steps, results = {}, {}
    for name in args.impls.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = memory_now(device)
        torch.manual_seed(0)
        steps[name] = builders[name]()
        for i in range(args.warmup):
            steps[name](data[i % len(data)])
        sync(device)
        grown = memory_now(device) - (0 if device.type == "cuda" else before)
        results[name] = {"times": [], "memory": grown, "batch": batch, "seq": seq, "arch": arch}
    for i in range(args.steps):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            loss = step(data[i % len(data)])
            sync(device)
            results[name]["times"].append(time.perf_counter() - t0)
            results[name]["loss"] = float(loss)
    if args.profile and "kiln" in steps:
        profile(steps["kiln"], data, device=device, folder=args.profile, steps=args.profile_steps, seq=seq)
    return results


def profile(step: Callable, data, *, device, folder: str, steps: int, seq: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for i in range(steps):
            step(data[i % len(data)])
        sync(device)
    path = os.path.join(folder, f"kiln_seq{seq}.json")
    prof.export_chrome_trace(path)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {steps} Kiln steps at seq {seq} -> {path}")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def table(all_results: dict[int, dict], *, peak: float, vocab: int) -> str:
    from parallel.plan.flops import flops_per_token, mfu

    lines = [
        "| seq | batch | impl | step ms | tokens/s | TFLOP/s | MFU | memory MiB | vs transformers | fastest step ms "
        "| vs transformers (fastest) | last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq, results in all_results.items():
        ref = results.get("transformers")
        ref_tps = None
        ref_best = min(ref["times"]) if ref is not None else None
        for name, r in results.items():
            step_s = statistics.median(r["times"])
            tps = r["batch"] * seq / step_s
            if name == "transformers":
                ref_tps = tps
            r["tokens_per_s"] = tps
        for name, r in results.items():
            flops = flops_per_token(r["arch"], seq_length=seq, vocab_size=vocab) * r["tokens_per_s"]
            ratio = f"{r['tokens_per_s'] / ref_tps:.2f}x" if ref is not None else "-"
            best = min(r["times"])
            best_ratio = f"{ref_best / best:.2f}x" if ref is not None else "-"
            lines.append(
                f"| {seq} | {r['batch']} | {name} | {statistics.median(r['times']) * 1e3:.0f} | "
                f"{r['tokens_per_s']:,.0f} | {flops / 1e12:.3f} | "
                f"{mfu(r['tokens_per_s'], flops_per_token=flops / r['tokens_per_s'], peak_flops=peak):.1%} | "
                f"{r['memory'] / 2**20:,.0f} | {ratio} | {best * 1e3:.0f} | {best_ratio} | {r['loss']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", default="256,1024", help="comma-separated sequence lengths")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (batch = this / seq)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", default="tiny", help="a llama3 size of models/llama.py")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated, of {', '.join([*KILN_VARIANTS, *IMPLS[1:]])}",
    )
    parser.add_argument("--attention", default="auto", help="Kiln's model.attention_backend")
    parser.add_argument("--profile", default="", help="folder for a torch profiler trace of Kiln's steps")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from parallel import engine
    from parallel.layout import ParallelLayout
    from parallel.plan import hardware
    from train.metrics import peak_flops_per_device

    device = engine.pick_device("auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine.init_distributed(device)
    engine.init_model_parallel(ParallelLayout(nproc_per_node=1), seed=1234, device=device)

    class NoPeak:
        peak_tflops = None

    peak = (
        peak_flops_per_device(NoPeak(), gpu="cpu", device=device, dtype=dtype)
        or hardware.DEVICES["cpu"].peak["fp32"]
    )
    results = {int(s): measure(args, int(s), device=device, dtype=dtype) for s in args.seq.split(",")}
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\nllama3 {args.size}, vocab {args.vocab}, {args.batch_tokens} tokens/step, {dtype}, {where}; "
        f"median of {args.steps} steps after {args.warmup} warm-up; Kiln attention {args.attention}"
    )
    print(table(results, peak=peak, vocab=args.vocab))
    if args.json:
        rows = [
            {
                "seq": seq,
                "impl": name,
                **{k: r[k] for k in ("batch", "tokens_per_s", "memory", "loss", "times")},
            }
            for seq, per_impl in results.items()
            for name, r in per_impl.items()
        ]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    engine.destroy()


if __name__ == "__main__":
    main()
