"""Blended, resumable datasets for a stage, built with megatron-core's BlendedMegatronDatasetBuilder.

The sample order is a pure function of (prepared data, mix, seed, sequence length), and a step's
samples are a pure function of the step: the loader's state is the global step, never per rank,
so a resumed run (at any data-parallel size) sees exactly the samples it would have seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from data.prepare import PreparedData
from data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def _gpt_config(prepared: PreparedData, *, seq_length: int, seed: int, valid_percent: int, blend):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=f"{100 - valid_percent},{valid_percent},0",
        path_to_cache=os.path.join(prepared.root, "index_cache"),
        tokenizer=load_tokenizer(prepared.tokenizer_path),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking is done inside attention
        mmap_bin_files=True,
    )


def _build(config, sizes):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def train_dataset(
    prepared: PreparedData,
    *,
    mix: dict[str, float],
    seq_length: int,
    samples: int,
    seed: int,
    valid_percent: int,
):
    """The stage's training blend: `samples` sequences drawn from the sources by the mix weights."""
    names = sorted(mix)
    blend = ([prepared.prefixes[n] for n in names], [float(mix[n]) for n in names])
    config = _gpt_config(prepared, seq_length=seq_length, seed=seed, valid_percent=valid_percent, blend=blend)
    return _build(config, [samples, 0, 0])[0]


def valid_datasets(
    prepared: PreparedData,
    *,
    sources: list[str],
    seq_length: int,
    samples: int,
    seed: int,
    valid_percent: int,
) -> dict:
    """One held-out dataset per source (the documents the training split never sees)."""
    out = {}
    for name in sources:
        config = _gpt_config(
            prepared,
            seq_length=seq_length,
            seed=seed,
            valid_percent=valid_percent,
            blend=([prepared.prefixes[name]], None),
        )
        out[name] = _build(config, [0, samples, 0])[1]
    return out


SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""The per-token tensors of a sample, (batch, seq) once collated."""


def micro_batches(dataset, indices: range, *, micro_batch: int) -> list[dict[str, torch.Tensor]]:
    """Collate `dataset[i]` for i in `indices` into micro-batches of `micro_batch` sequences."""
    out = []
    idx = list(indices)
    for start in range(0, len(idx), micro_batch):
        samples = [dataset[i] for i in idx[start : start + micro_batch]]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in SEQUENCE_KEYS})
    return out


class Prefetcher:
    """Builds step s + 1's micro-batches on a background thread while step s trains, so the loop waits on data
    only when building a batch takes longer than a training step. `build(step)` gives a step's micro-batches
    (a pure function of the step, so resuming at any step needs no loader state). `pin`: page-locked host memory,
    so the engine's non_blocking copy to the GPU overlaps compute."""

    def __init__(self, build: Callable[[int], list[dict]], *, end: int, pin: bool = False) -> None:
        self._build, self._end, self._pin = build, end, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: tuple[int, Future] | None = None

    def _make(self, step: int) -> list[dict]:
        micro = self._build(step)
        if self._pin:
            micro = [{k: v.pin_memory() for k, v in mb.items()} for mb in micro]
        return micro

    def get(self, step: int) -> list[dict]:
        """Step `step`'s micro-batches; starts building the next step's before returning."""
        if self._next is not None and self._next[0] == step:
            future = self._next[1]
        else:  # first call, or a jump (resume): build this one now
            future = self._pool.submit(self._make, step)
        self._next = (step + 1, self._pool.submit(self._make, step + 1)) if step + 1 < self._end else None
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def step_indices(first: int, *, batch_sequences: int, dp_rank: int, dp_size: int) -> range:
    """This data-parallel rank's share of the global batch of `batch_sequences` samples that starts at sample
    `first` (a contiguous slice of the global sample order)."""
    per_rank = batch_sequences // dp_size
    start = first + dp_rank * per_rank
    return range(start, start + per_rank)


def split_sequences(micro: list[dict[str, torch.Tensor]], seq_length: int) -> list[dict[str, torch.Tensor]]:
    """Cut each sample of each micro-batch into sequences of `seq_length` tokens, in order, each with its own
    positions from 0 (sequence-length warm-up, train/ramp.py); per-sample tensors ("source") are repeated."""
    out = []
    for mb in micro:
        rows, length = mb["tokens"].shape
        k = length // seq_length
        cut = {}
        for key, v in mb.items():
            if key in SEQUENCE_KEYS:
                cut[key] = v.reshape(rows * k, seq_length)
            else:
                cut[key] = v.repeat_interleave(k, dim=0)
        cut["position_ids"] = cut["position_ids"] - cut["position_ids"][:, :1]
        out.append(cut)
    return out
