"""How long a checkpoint save holds up the step loop: synchronous vs async (`checkpoint.async_save`).

    python bench/checkpoint_save.py [--layers 8] [--hidden 512] [--steps 12] [--save-every 4]

One process (a world of one, gloo on CPU; the GPU when there is one), a Llama-style model with AdamW through
megatron-core (distributed optimizer), trained three ways on the same batches: without saving, saving
synchronously every `--save-every` steps, and saving asynchronously as often (each after one untimed warm-up
save: the first save of a process also starts megatron-core's result-queue process, seconds). Per way it prints, as a markdown
table: the checkpoint size, the median training step, the loop's stall per save: the `checkpoint.save` call and
the `wait_for_saves` calls after each step (for async saves they finalize: fsync and hash every file for the
COMPLETE record, rename, `latest`), the total wall time of the steps, and its overhead over the run without saves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    import torch

    from models.gpt import build_model
    from models.registry import resolve_arch
    from parallel import engine
    from parallel.layout import ParallelLayout
    from train import checkpoint
    from train.checkpoint import CheckpointConfig
    from train.schedule import build_scheduler

    device = engine.pick_device("auto")
    engine.init_distributed(device)
    layout = ParallelLayout(nproc_per_node=1, micro_batch=2)
    engine.init_model_parallel(layout, seed=1234, device=device)
    arch = resolve_arch(
        "llama3",
        "tiny",
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=8,
        num_kv_heads=4,
    )
    vocab = 4096
    tokens = torch.randint(0, vocab, (2, args.seq + 1), generator=torch.Generator().manual_seed(0)).to(device)

    def build():
        ddp = engine.wrap_ddp(build_model(arch, vocab_size=vocab, max_seq_length=args.seq).to(device), layout)
        engine.configure_schedule_hooks(ddp)
        opt = engine.build_optimizer(
            ddp,
            layout=layout,
            lr=1e-3,
            min_lr=0.0,
            weight_decay=0.0,
            betas=(0.9, 0.95),
            eps=1e-8,
            clip_grad=1.0,
            bf16=False,
        )
        sched = build_scheduler(
            opt, peak_lr=1e-3, min_lr=0.0, tokens=10**9, warmup_tokens=0, schedule="cosine"
        )
        return ddp, opt, sched

    def step(ddp, opt) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def fwd(it, model):
            x = next(it)
            pos = torch.arange(args.seq, device=device).expand(2, -1)
            out = model(x[:, :-1], pos, None, labels=x[:, 1:])
            return out, lambda o: (o.mean(), {"loss": o.mean().detach().clone()})

        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = get_forward_backward_func()(
            forward_step_func=fwd,
            data_iterator=iter([tokens]),
            model=[ddp],
            num_microbatches=1,
            seq_length=args.seq,
            micro_batch_size=2,
        )
        opt.step()
        return res[0]["loss"].item()

    rows = []
    for mode in ("none", "sync", "async"):
        torch.manual_seed(0)
        ddp, opt, sched = build()
        step(ddp, opt)  # warm-up: allocates Adam state
        directory = tempfile.mkdtemp(prefix=f"kiln-bench-ckpt-{mode}-")
        retention = CheckpointConfig(keep_last=1, async_save=mode == "async")
        if mode != "none":  # warm-up save: megatron-core's writer starts its result-queue process once
            scratch = tempfile.mkdtemp(prefix="kiln-bench-ckpt-warmup-")
            state = {"step": 0, "tokens": 0, "final": False}
            checkpoint.save(
                scratch, model=ddp.module, optimizer=opt, scheduler=sched, state=state, retention=retention
            )
            checkpoint.wait_for_saves()
            shutil.rmtree(scratch)
        step_times, calls, finals, losses, size = [], [], [], [], 0
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            t0 = time.perf_counter()
            losses.append(step(ddp, opt))
            sched.step(2 * args.seq)
            step_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.wait_for_saves(blocking=False)
            finals.append(time.perf_counter() - t0)
            if mode != "none" and i % args.save_every == 0:
                t0 = time.perf_counter()
                checkpoint.save(
                    directory,
                    model=ddp.module,
                    optimizer=opt,
                    scheduler=sched,
                    state={"step": i, "tokens": i, "final": False},
                    retention=retention,
                )
                calls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpoint.wait_for_saves()
        finals.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        if mode != "none":
            last = checkpoint.latest(directory)
            with open(os.path.join(last, checkpoint.COMPLETE_FILE)) as f:
                size = sum(entry[0] for entry in json.load(f)["files"].values())
        shutil.rmtree(directory)
        saves = args.steps // args.save_every if mode != "none" else 0
        per_save = [sum(calls) / max(saves, 1), sum(finals) / max(saves, 1)]
        rows.append((mode, size, statistics.median(step_times), per_save, wall, losses))

    base_wall = rows[0][4]
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {sum(p.numel() for p in ddp.parameters()) / 1e6:.1f}M "
        f"params; {args.steps} steps, a save every {args.save_every}; device {device}\n"
    )
    print(
        "| saving | checkpoint | median step | loop stall per save: save call | + finalize | wall time "
        "| overhead vs no saves |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, size, med, (call, final), wall, _ in rows:
        print(
            f"| {mode} | {size / 2**20:.0f} MiB | {med:.3f} s | {call:.3f} s | {final:.3f} s "
            f"| {wall:.2f} s | {wall - base_wall:+.2f} s |"
        )
    assert rows[1][5] == rows[2][5] == rows[0][5], "saving must not change the losses"
    engine.destroy()


if __name__ == "__main__":
    main()
