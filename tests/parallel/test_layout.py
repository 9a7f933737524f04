"""ParallelLayout: inference of dp and errors that name the constraint and the nearest valid values."""

from __future__ import annotations

import pytest

from parallel.layout import ParallelLayout
from train.errors import ConfigError


def test_dp_is_inferred():
    layout = ParallelLayout(nproc_per_node=4, tp=2)
    assert layout.world_size == 4 and layout.dp_size == 2
    assert layout.grad_accum(16) == 16 // (2 * layout.micro_batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"nproc_per_node": 4, "tp": 3},
            "parallel.tp=3: tp*pp=3 must divide the world size 4; try tp=2 or tp=4",
        ),
        (
            {"nproc_per_node": 4, "tp": 2, "dp": 4},
            "parallel.dp=4: dp*tp*pp must equal the world size 4; use dp=2",
        ),
        ({"sp": True}, "parallel.sp=True: sequence parallelism needs parallel.tp > 1"),
        ({"engine": "fsdp"}, "parallel.engine='fsdp': choose one of megatron"),
        ({"micro_batch": 0}, "parallel.micro_batch=0: must be >= 1"),
        ({"pp": 2}, "parallel.pp=2: pipeline parallelism is not wired"),
    ],
)
def test_invalid_layouts(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ParallelLayout(**kwargs)
    assert str(err.value).startswith(message)


def test_model_and_batch_checks():
    layout = ParallelLayout(nproc_per_node=4, tp=4)
    with pytest.raises(ConfigError, match=r"tp must divide 8 heads and 2 kv heads; try tp=2"):
        layout.check_model(heads=8, kv_heads=2)
    layout = ParallelLayout(nproc_per_node=2, micro_batch=4)
    layout.check_batch(key="k", sequences=16)
    with pytest.raises(ConfigError, match=r"k=12: .* multiple of dp\*micro_batch = 2\*4 = 8; try 8 or 16"):
        layout.check_batch(key="k", sequences=12)
