"""Training metrics, computed once per logging interval and shared by every sink (JSONL, wandb, TensorBoard,
progress).

One `StageMetrics` per stage accumulates per-step phase times (data wait, forward-backward, gradient-sync
wait, optimizer) over the logging window and turns them into one flat record: throughput (tokens/s global
and per GPU), TFLOP/s per GPU and MFU on the planner's FLOPs definition (`parallel.plan.flops`), memory,
update/parameter norm ratio, per-source data position and ETA. Every `straggler_every_steps` it gathers
per-rank busy times and names ranks slower than the median by `straggler_factor`.

Record keys (all flat, numbers unless noted): tokens_per_s, tokens_per_s_per_gpu, tflops_per_gpu, mfu,
time/{step,data_wait,forward_backward,grad_sync,optimizer} (seconds per step, window mean),
mem/{peak_allocated_gb,peak_reserved_gb} (CUDA) or mem/rss_gb (CPU), update_norm (||params after - before||
of the logging step), update_ratio (update_norm / param_norm), param_norm,
data/<source>/samples, data/<source>/fraction, eta/stage_s, eta/recipe_s, straggler/{ratio,slowest_rank}.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from parallel.plan.flops import flops_per_token, mfu

log = logging.getLogger(__name__)

PHASES = ("data_wait", "forward_backward", "grad_sync", "optimizer")
FAULT_ENV = "KILN_FAULT_SLOW_RANK"
"""Fault injection for the straggler test: "RANK:SECONDS" sleeps that long in RANK's data wait each step."""


# torch.cuda.get_device_name() fragments -> keys of the planner's device table (parallel/plan/hardware.py).
CUDA_NAMES = (("H200", "h200"), ("H100 PCIe", "h100_pcie"), ("H100", "h100_sxm"), ("B200", "b200"),
              ("A100-SXM4-40GB", "a100_40gb"), ("A100", "a100"), ("MI300X", "mi300x"))  # fmt: skip


def peak_flops_per_device(logging_cfg, *, gpu: str, device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of one device in the training dtype: `logging.peak_tflops` when set, else the
    planner's device table for `cluster.gpu`; on a GPU run whose cluster says cpu (cluster=local), the
    table entry the CUDA device name matches. None (MFU not logged) when the device is not in the table."""
    from parallel.plan import hardware

    if logging_cfg.peak_tflops:
        return logging_cfg.peak_tflops * 1e12
    if device.type == "cuda" and gpu == "cpu":
        name = torch.cuda.get_device_name(device)
        gpu = next((key for frag, key in CUDA_NAMES if frag in name), "")
    if gpu not in hardware.DEVICES:
        return None
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return hardware.DEVICES[gpu].peak.get(kind)


def _injected_delay() -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and dist.is_initialized():
        rank, seconds = spec.split(":")
        if dist.get_rank() == int(rank):
            time.sleep(float(seconds))


def _param_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of the model's parameters: this rank's, tensor-parallel duplicates counted once,
    summed over the model-parallel (tensor x pipeline) group. Experts sharded over an expert-parallel group
    count this rank's experts only."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    own = [p for p in params if param_is_not_tensor_parallel_duplicate(p)]
    sq = torch.stack([p.detach().float().pow(2).sum() for p in own]).sum()
    if (
        parallel_state.get_model_parallel_group() is not None
        and dist.get_world_size(parallel_state.get_model_parallel_group()) > 1
    ):
        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return sq


def find_stragglers(times: list[float], *, factor: float) -> tuple[list[int], float]:
    """Ranks whose time exceeds factor x the median (the lower middle value, so with two ranks the slower
    is compared with the faster), and that median."""
    median = statistics.median_low(times)
    return [r for r, t in enumerate(times) if t > factor * median], median


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    days, rest = divmod(seconds, 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock


class StageMetrics:
    """Per-stage accumulator. Call `phase(...)` around each part of a step, `end_step()` after it, and
    `interval(...)` on logging steps to get the record (and reset the window)."""

    def __init__(
        self,
        *,
        logging_cfg,
        stage,
        arch,
        padded_vocab: int,
        device: torch.device,
        sources: list[str],
        later_tokens: int,
        peak_flops: float | None,
    ) -> None:
        self.cfg = logging_cfg
        self.stage = stage
        self.device = device
        self.sources = sources
        self.later_tokens = later_tokens
        """Training tokens of the recipe's stages after this one (for the recipe ETA)."""
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._flops = functools.partial(
            flops_per_token, arch, vocab_size=padded_vocab, convention=logging_cfg.flops_convention
        )
        self.flops_per_token = self._flops(seq_length=stage.seq_length)
        self.peak_flops = peak_flops
        self._reset_window()
        self._straggler_busy = 0.0
        self._straggler_steps = 0
        self._step_start = self._sync_at_start = 0.0
        self._before: list[torch.Tensor] | None = None
        self._ratio_ok = True
        self._straggler: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ timing
    def _reset_window(self) -> None:
        self.steps = 0
        self.tokens, self.flops = 0, 0.0  # trained in the window (a ramp changes both per step)
        self.times = dict.fromkeys(("step", *PHASES), 0.0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def start_step(self) -> None:
        self._step_start = time.perf_counter()
        self._sync_at_start = self.times["grad_sync"]

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
            if name == "data_wait":
                _injected_delay()
        finally:
            self.times[name] += time.perf_counter() - start

    def attach(self, engine) -> None:
        """Time megatron-core's finalize_model_grads (waiting for the bucketed gradient reduce) as the
        grad_sync phase: on a fast rank it is the time spent waiting for slower ones. DeepSpeed reduces
        inside backward, where it cannot be told apart (grad_sync stays 0)."""
        self._ratio_ok = getattr(engine, "name", "") == "megatron"  # ZeRO-3 partitions the parameters
        configs = {id(m.config): m.config for m in getattr(engine, "ddp", [])}
        for config in configs.values():
            inner = config.finalize_model_grads_func
            if inner is None:
                continue

            def timed(*args, _inner=inner, **kwargs):
                # On GPU the reduce runs on streams: synchronize around it, so the phase is the host's wait
                # for the slowest rank's gradients, not the launch (the loss .item() syncs right after anyway).
                cuda = self.device.type == "cuda"
                if cuda:
                    torch.cuda.synchronize(self.device)
                with self.phase("grad_sync"):
                    out = _inner(*args, **kwargs)
                    if cuda:
                        torch.cuda.synchronize(self.device)
                return out

            config.finalize_model_grads_func = timed

    def end_step(self, *, tokens: int, seq_length: int) -> None:
        """After a step of `tokens` tokens in sequences of `seq_length` (the attention FLOPs depend on it)."""
        elapsed = time.perf_counter() - self._step_start
        self.times["step"] += elapsed
        self.steps += 1
        self.tokens += tokens
        self.flops += tokens * self._flops(seq_length=seq_length)
        # Busy = the step less the wait for other ranks' gradients: what a slow rank has more of.
        self._straggler_busy += elapsed - (self.times["grad_sync"] - self._sync_at_start)
        self._straggler_steps += 1

    # --------------------------------------------------------------------- update / param ratio
    def before_update(self, params: list[torch.Tensor]) -> None:
        """Snapshot the parameters before the optimizer step (logging steps only: one copy of the
        rank's parameters for the duration of the step)."""
        if self.cfg.update_ratio and self._ratio_ok:
            self._before = [p.detach().clone() for p in params]

    def _update_ratio(self, params: list[torch.Tensor]) -> dict[str, float]:
        if self._before is None:
            return {}
        delta = [p.detach().float() - b.float() for p, b in zip(params, self._before, strict=True)]
        for d, p in zip(delta, params, strict=True):  # carry the TP attributes onto the difference
            d.tensor_model_parallel = getattr(p, "tensor_model_parallel", False)
            d.partition_dim = getattr(p, "partition_dim", -1)
        self._before = None
        upd, norm = _param_norm(delta).sqrt().item(), _param_norm(params).sqrt().item()
        return {"update_norm": upd, "update_ratio": upd / norm if norm else float("nan"), "param_norm": norm}

    # ------------------------------------------------------------------------------ stragglers
    def straggler_check(self, step: int) -> None:
        """Every `straggler_every_steps` steps (a collective: all ranks call it on the same steps), gather
        each rank's mean busy step time and warn about ranks slower than median x factor. The median is
        the lower middle value, so with two ranks the slow one is compared with the fast one."""
        every = self.cfg.straggler_every_steps
        if not every or step % every or self.world == 1:
            return
        busy = self._straggler_busy / max(1, self._straggler_steps)
        self._straggler_busy, self._straggler_steps = 0.0, 0
        mine = torch.tensor([busy], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        times = [float(t.item()) for t in gathered]
        slow, median = find_stragglers(times, factor=self.cfg.straggler_factor)
        if slow and dist.get_rank() == 0:
            log.warning(
                "straggler: rank(s) %s slower than %.2f x median step time %.3f s: %s",
                ", ".join(map(str, slow)),
                self.cfg.straggler_factor,
                median,
                ", ".join(f"rank {r} {times[r]:.3f} s" for r in slow),
            )
        slowest = max(range(self.world), key=times.__getitem__)
        self._straggler = {
            "straggler/ratio": times[slowest] / median if median else float("nan"),
            "straggler/slowest_rank": slowest,
        }

    # -------------------------------------------------------------------------------- record
    def stage_record(self, name: str, *, step: int) -> dict:
        """The stage-start record: the planned mix and the constants the interval metrics derive from."""
        total = sum(self.stage.mix.values())
        return {
            "stage": name,
            "step": step,
            "event": "stage_start",
            "seq_length": self.stage.seq_length,
            "batch_tokens": self.stage.batch_tokens,
            "steps": self.stage.steps,
            "world_size": self.world,
            "flops_per_token": self.flops_per_token,
            "peak_flops_per_gpu": self.peak_flops,
            **{f"planned/{s}": w / total for s, w in sorted(self.stage.mix.items())},
        }

    def interval(
        self,
        *,
        step: int,
        tokens: int,
        params: list[torch.Tensor],
        consumed_ids=None,
        extra: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """The window's metrics. `tokens`: trained in the stage so far (for the ETA); `consumed_ids`: the blend source of every sample trained on so far in the
        stage (numpy array or None); `extra`: more metrics to log as given (e.g. MoE expert load)."""
        stage, n = self.stage, max(1, self.steps)
        rec: dict[str, float] = {f"time/{k}": v / n for k, v in self.times.items()}
        step_time = rec["time/step"]
        # Throughput over the training steps of the window (evaluation and checkpoint time excluded).
        tps = self.tokens / n / step_time if step_time else 0.0
        per_token = self.flops / self.tokens if self.tokens else self.flops_per_token
        rec["tokens_per_s"] = tps
        rec["tokens_per_s_per_gpu"] = tps / self.world
        rec["flops_per_token"] = per_token
        rec["tflops_per_gpu"] = tps / self.world * per_token / 1e12
        if self.peak_flops:
            rec["mfu"] = mfu(tps, flops_per_token=per_token, peak_flops=self.peak_flops * self.world)
        rec.update(self._memory())
        rec.update(self._update_ratio(params))
        if consumed_ids is not None and len(consumed_ids):
            counts = np.bincount(np.asarray(consumed_ids), minlength=len(self.sources))
            for i, name in enumerate(self.sources):
                rec[f"data/{name}/samples"] = int(counts[i])
                rec[f"data/{name}/fraction"] = float(counts[i] / counts.sum())
        if tps:
            rec["eta/stage_s"] = (stage.trained_tokens - tokens) / tps
            rec["eta/recipe_s"] = rec["eta/stage_s"] + self.later_tokens / tps
        rec.update(self._straggler)  # the check since the last interval, if any
        self._straggler = {}
        rec.update(extra or {})
        self._reset_window()
        return rec

    def _memory(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {
                "mem/peak_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "mem/peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 2**30,
            }
        import psutil

        return {"mem/rss_gb": psutil.Process().memory_info().rss / 2**30}


POSITION_BUCKETS = 8
"""Validation loss by position is reported in this many equal-width buckets of the context."""


def tag_sources(micro: list[dict], dataset, indices: range) -> None:
    """Give each micro-batch the one-hot blend source of its samples ("source", (batch, sources)), so the
    engines can report the loss per source. A single-source dataset (megatron-core builds a plain GPTDataset
    when the mix has one source) is left untagged."""
    index = getattr(dataset, "dataset_index", None)
    if index is None:
        return
    ids = torch.as_tensor(np.asarray(index[indices.start : indices.stop]), dtype=torch.long)
    onehot = torch.nn.functional.one_hot(ids, len(dataset.datasets)).float()
    size = micro[0]["tokens"].shape[0] if micro else 0
    for i, mb in enumerate(micro):
        mb["source"] = onehot[i * size : (i + 1) * size]


def consumed_sources(dataset, *, samples: int):
    """The blend source of each of the first `samples` samples of the stage (None for a single source)."""
    index = getattr(dataset, "dataset_index", None)
    return None if index is None else np.asarray(index[:samples])


def loss_pairs(losses: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """[sum, count] pairs of one micro-batch's masked per-token losses (batch, seq), for the engines' loss
    functions: per position bucket ("position loss", (buckets, 2)) and, when the batch carries its samples'
    one-hot sources, per source ("source loss", (sources, 2))."""
    mask = batch["loss_mask"].float()
    per_token = losses.detach().float() * mask
    seq = per_token.shape[1]
    buckets = POSITION_BUCKETS if seq % POSITION_BUCKETS == 0 else 1
    out = {
        "position loss": torch.stack(
            [per_token.sum(0).view(buckets, -1).sum(1), mask.sum(0).view(buckets, -1).sum(1)], dim=1
        )
    }
    if "source" in batch:  # (batch, sources)^T @ (batch, 2) -> (sources, 2)
        out["source loss"] = batch["source"].T.float() @ torch.stack([per_token.sum(1), mask.sum(1)], dim=1)
    return out


def reduce_breakdown(entries: list[dict], *, group=None) -> dict[str, torch.Tensor]:
    """Sum the `loss_pairs` of a step's micro-batches (entries may hold other keys) and over `group`."""
    keys = [k for k in ("position loss", "source loss") if entries and k in entries[0]]
    out = {}
    for key in keys:
        total = torch.stack([e[key] for e in entries]).sum(dim=0)
        dist.all_reduce(total, group=group)
        out[key] = total
    return out


def _means(total: torch.Tensor | None) -> list[float | None]:
    return [] if total is None else [s / c if c > 0 else None for s, c in total.tolist()]


def source_losses(engine, sources: list[str]) -> dict[str, float]:
    """`loss/<source>` token means of the engine's last batch (sources without tokens are left out; nothing
    when the engine could not report them, e.g. under pipeline parallelism)."""
    means = _means(getattr(engine, "loss_breakdown", {}).get("source loss"))
    return {f"loss/{name}": m for name, m in zip(sources, means) if m is not None}


def position_losses(engine) -> list[float | None]:
    """Token-mean loss per position bucket of the engine's last batch ([] when not reported)."""
    return _means(getattr(engine, "loss_breakdown", {}).get("position loss"))
