"""The prefetching loader: the same batches in the same order as building them inline, the next step's built
in the background before the loop asks for it, and a resume (a jump) served correctly."""

from __future__ import annotations

import threading

import torch

from data.blend import Prefetcher


def _build_recorder():
    built, ready = [], {}

    def build(step: int) -> list[dict]:
        built.append((step, threading.current_thread().name))
        ready.setdefault(step, threading.Event()).set()
        return [{"tokens": torch.full((2, 4), step)}]

    return build, built, ready


def test_prefetch_gives_each_step_once_in_order_and_builds_ahead():
    build, built, ready = _build_recorder()
    loader = Prefetcher(build, end=4)
    for step in range(4):
        micro = loader.get(step)
        assert torch.equal(micro[0]["tokens"], torch.full((2, 4), step))
        if step + 1 < 4:  # the next step is being built without the loop asking for it
            assert ready.setdefault(step + 1, threading.Event()).wait(timeout=60)
    loader.close()
    assert [s for s, _ in built] == [0, 1, 2, 3]  # each step built once, none past the end
    assert all(name.startswith("prefetch") for _, name in built)


def test_prefetch_serves_a_jump():
    build, built, _ = _build_recorder()
    loader = Prefetcher(build, end=10)
    assert loader.get(5)[0]["tokens"][0, 0] == 5
    assert loader.get(2)[0]["tokens"][0, 0] == 2  # not the prefetched 6
    assert loader.get(3)[0]["tokens"][0, 0] == 3
    loader.close()
    assert [s for s, _ in built][:3] == [5, 6, 2]
