"""ParallelLayout: inference of dp, and one test per rule: the error names the constraint, the values and the
nearest layouts that work."""

from __future__ import annotations

import pytest

from parallel.layout import ParallelLayout
from train.errors import ConfigError


def test_sizes_are_inferred():
    layout = ParallelLayout(nproc_per_node=8, tp=2, pp=2, ep=2)
    assert layout.world_size == 8 and layout.dp_size == 2 and layout.expert_dp_size == 2
    assert layout.accum_steps(16) == 16 // (2 * layout.micro_batch)
    assert ParallelLayout(nproc_per_node=4, cp=1, tp=2, dp=2).dp_size == 2
    assert ParallelLayout(nproc_per_node=2).distributed_optimizer
    assert not ParallelLayout(nproc_per_node=2, zero_stage=0).distributed_optimizer
    assert not ParallelLayout(nproc_per_node=2, engine="deepspeed", zero_stage=1).distributed_optimizer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"nproc_per_node": 4, "tp": 3},
            "parallel.tp=3: tp*cp*pp=3*1*1=3 does not divide the world size 4; try tp=2 or tp=4",
        ),
        (
            {"nproc_per_node": 8, "tp": 4, "pp": 4},
            "parallel.tp=4: tp*cp*pp=4*1*4=16 does not divide the world size 8; try tp=2 or pp=2",
        ),
        (
            {"nproc_per_node": 4, "tp": 2, "dp": 4},
            "parallel.dp=4: dp*tp*cp*pp must equal the world size 4; use dp=2 or dp=-1",
        ),
        (
            {"nproc_per_node": 4, "ep": 3},
            "parallel.ep=3: ep*etp*pp=3*1*1=3 does not divide the world size 4; try ep=2 or ep=4",
        ),
        ({"sp": True}, "parallel.sp=True: sequence parallelism needs parallel.tp > 1"),
        ({"vpp": 2}, "parallel.vpp=2: virtual pipeline stages need parallel.pp > 1"),
        ({"engine": "fsdp"}, "parallel.engine='fsdp': choose one of megatron, deepspeed"),
        ({"recompute": "some"}, "parallel.recompute='some': choose one of none, selective, full"),
        ({"offload": "nvme"}, "parallel.offload='nvme': choose one of none, optimizer, optimizer+param"),
        ({"zero_stage": 4}, "parallel.zero_stage=4: choose 0, 1, 2 or 3"),
        ({"micro_batch": 0}, "parallel.micro_batch=0: must be >= 1"),
        ({"grad_accum": 0}, "parallel.grad_accum=0: use a positive size, or -1"),
        (
            {"zero_stage": 3},
            "parallel.zero_stage=3: the megatron engine shards optimizer state only (zero_stage=1",
        ),
        ({"offload": "optimizer"}, "parallel.offload='optimizer': CPU offload is a deepspeed feature"),
        (
            {"engine": "deepspeed", "nproc_per_node": 4, "pp": 2},
            "parallel.pp=2: engine=deepspeed runs data and tensor parallel only in Kiln: DeepSpeed's pipeline engine",
        ),
        (
            {"engine": "deepspeed", "nproc_per_node": 4, "ep": 2},
            "parallel.ep=2: engine=deepspeed runs data and tensor parallel only in Kiln",
        ),
        (
            {"engine": "deepspeed", "nproc_per_node": 2, "tp": 2, "sp": True},
            "parallel.sp=True: engine=deepspeed does not all-reduce the sequence-parallel norm gradients",
        ),
        (
            {"engine": "deepspeed", "zero_stage": 2, "offload": "optimizer+param"},
            "parallel.offload='optimizer+param': parameter offload needs zero_stage=3 (got 2)",
        ),
        (
            {"engine": "deepspeed", "zero_stage": 0, "offload": "optimizer"},
            "parallel.offload='optimizer': optimizer offload needs zero_stage >= 1",
        ),
    ],
)
def test_invalid_layouts(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ParallelLayout(**kwargs)
    assert str(err.value).startswith(message)


def test_deepspeed_layouts_that_work():
    for stage in (0, 1, 2, 3):
        ParallelLayout(engine="deepspeed", zero_stage=stage)
    ParallelLayout(engine="deepspeed", zero_stage=3, offload="optimizer+param")
    ParallelLayout(engine="deepspeed", zero_stage=2, offload="optimizer")
    assert ParallelLayout(nproc_per_node=4, engine="deepspeed", zero_stage=3, tp=2).dp_size == 2


def test_context_parallel_layouts_and_refusals():
    """CP runs on the megatron engine without TransformerEngine (parallel/context.py); deepspeed is refused by
    name."""
    assert ParallelLayout(nproc_per_node=2, cp=2).dp_size == 1
    assert ParallelLayout(nproc_per_node=4, cp=2).dp_size == 2
    assert ParallelLayout(nproc_per_node=8, cp=2, tp=2, sp=True).dp_size == 2
    ParallelLayout(nproc_per_node=4, cp=2).check_model(heads=4, kv_heads=1, experts=4)  # MQA, MoE: fine
    with pytest.raises(ConfigError) as err:
        ParallelLayout(nproc_per_node=2, cp=2, engine="deepspeed")
    assert str(err.value).startswith(
        "parallel.cp=2: engine=deepspeed runs data and tensor parallel only in Kiln: context parallelism is "
        "megatron's (engine=megatron); set cp=1, or engine=megatron"
    )
    # megatron's distributed optimizer shards over dp x cp (measured in tests/parallel/test_parity.py)
    cp2_dp2 = ParallelLayout(nproc_per_node=4, cp=2).model_state_bytes(10**6)
    assert cp2_dp2 == ParallelLayout(nproc_per_node=4).model_state_bytes(10**6)


def test_tensor_parallel_must_divide_heads_and_kv_heads():
    ParallelLayout(nproc_per_node=8, tp=2).check_model(heads=32, kv_heads=8)
    with pytest.raises(ConfigError) as err:
        ParallelLayout(nproc_per_node=6, tp=3).check_model(heads=32, kv_heads=8)
    assert str(err.value) == (
        "parallel.tp=3: tp=3 does not divide 8 kv heads (32 heads, 8 kv heads); try tp=2"
    )
    with pytest.raises(ConfigError, match=r"tp=4 does not divide 2 kv heads .*; try tp=2"):
        ParallelLayout(nproc_per_node=4, tp=4).check_model(heads=8, kv_heads=2)
    with pytest.raises(ConfigError, match=r"tp=3 does not divide 8 kv heads .*; try tp=2 or tp=4"):
        ParallelLayout(nproc_per_node=12, tp=3).check_model(heads=24, kv_heads=8)


def test_pipeline_stages_must_divide_layers():
    ParallelLayout(nproc_per_node=4, pp=2, vpp=2).check_model(heads=8, kv_heads=2, layers=4)
    with pytest.raises(ConfigError) as err:
        ParallelLayout(nproc_per_node=4, pp=4).check_model(heads=8, kv_heads=2, layers=6)
    assert str(err.value) == "parallel.pp=4: pp*vpp=4*1=4 model chunks do not divide 6 layers; try pp=2"
    with pytest.raises(
        ConfigError, match=r"pp\*vpp=2\*4=8 model chunks do not divide 4 layers; .*vpp in \[1, 2\]"
    ):
        ParallelLayout(nproc_per_node=2, pp=2, vpp=4).check_model(heads=8, kv_heads=2, layers=4)


def test_expert_parallel_needs_experts_it_divides():
    ParallelLayout(nproc_per_node=4, ep=4).check_model(heads=8, kv_heads=2, experts=8)
    with pytest.raises(ConfigError, match=r"parallel.ep=2: expert parallelism needs a mixture-of-experts"):
        ParallelLayout(nproc_per_node=2, ep=2).check_model(heads=8, kv_heads=2, experts=0)
    with pytest.raises(ConfigError) as err:
        ParallelLayout(nproc_per_node=4, ep=4).check_model(heads=8, kv_heads=2, experts=6)
    assert str(err.value) == "parallel.ep=4: ep=4 does not divide 6 experts; try ep=2"
    with pytest.raises(ConfigError, match=r"parallel.sp=False: megatron-core MoE layers with tp > 1 need"):
        ParallelLayout(nproc_per_node=4, tp=2, ep=2).check_model(heads=8, kv_heads=2, experts=4)


def test_global_batch_splits_into_micro_batches():
    layout = ParallelLayout(nproc_per_node=2, micro_batch=4)
    layout.check_batch(key="k", sequences=16)
    with pytest.raises(ConfigError, match=r"k=12: .* multiple of dp\*micro_batch = 2\*4 = 8; try 8 or 16"):
        layout.check_batch(key="k", sequences=12)
    fixed = ParallelLayout(nproc_per_node=2, micro_batch=2, grad_accum=2)
    fixed.check_batch(key="k", sequences=8)
    with pytest.raises(ConfigError) as err:
        fixed.check_batch(key="stages.base.batch_tokens", sequences=16)
    assert str(err.value) == (
        "parallel.grad_accum=2: stages.base.batch_tokens: a global batch of 16 sequences = "
        "dp*micro_batch*grad_accum = 2*2*grad_accum needs grad_accum=4; set grad_accum=4 or -1 (infer)"
    )


def test_interleaved_pipeline_needs_micro_batches_in_multiples_of_pp():
    layout = ParallelLayout(nproc_per_node=2, pp=2, vpp=2, micro_batch=1)
    layout.check_batch(key="k", sequences=4)
    with pytest.raises(
        ConfigError, match=r"k=3: the interleaved pipeline .* \(3\) .* of pp=2; try 4 sequences"
    ):
        layout.check_batch(key="k", sequences=3)


def test_sequence_and_context_parallel_split_the_sequence():
    sp = ParallelLayout(nproc_per_node=4, tp=4, sp=True, micro_batch=1)
    sp.check_batch(key="stages.base.batch_tokens", sequences=4, seq_length=256)
    with pytest.raises(ConfigError) as err:
        sp.check_batch(key="stages.base.batch_tokens", sequences=4, seq_length=258)
    assert str(err.value) == (
        "stages.base.seq_length=258: the sequence length must be a multiple of tp (sequence parallel) = 4; "
        "try 256"
    )
    cp = ParallelLayout(nproc_per_node=4, tp=2, sp=True, cp=2, micro_batch=1)
    cp.check_batch(key="k.batch", sequences=1, seq_length=96)
    with pytest.raises(
        ConfigError, match=r"multiple of tp\*2\*cp \(sequence and context parallel\) = 8; try 96"
    ):
        cp.check_batch(key="k.batch", sequences=1, seq_length=100)
    cp = ParallelLayout(nproc_per_node=2, cp=2, micro_batch=1)
    cp.check_batch(key="k.batch", sequences=1, seq_length=100)
    with pytest.raises(ConfigError) as err:
        cp.check_batch(key="k.batch", sequences=1, seq_length=102)
    assert str(err.value) == (
        "k.seq_length=102: the sequence length must be a multiple of 2*cp (context parallel) = 4; try 100"
    )


def test_model_state_bytes_follow_zero_stages():
    """ZeRO (Rajbhandari et al. 2020) Fig. 1: Psi = 7.5B, N_d = 64, mixed precision: baseline 120 GB per rank,
    stage 1 (P_os) 31.4 GB, stage 2 (P_os+g) 16.6 GB, stage 3 (P_os+g+p) 1.9 GB. DeepSpeed: 2-byte gradients."""
    psi = 7.5e9
    per_rank = {
        z: sum(
            ParallelLayout(nproc_per_node=64, engine="deepspeed", zero_stage=z)
            .model_state_bytes(int(psi), mixed_precision=True)
            .values()
        )
        / 1e9
        for z in range(4)
    }
    assert per_rank == pytest.approx({0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}, abs=0.06)
    tp_pp = ParallelLayout(nproc_per_node=8, tp=2, pp=2, zero_stage=1).model_state_bytes(1000)
    assert tp_pp == {
        "params": 1000.0,
        "grads": 1000.0,
        "optimizer": 1000.0,
    }  # 250 params: 4, 4, 8/2 bytes each


def test_pipeline_end_stages_hold_the_embeddings():
    # 1000 parameters of which 2 x 100 are embedding and output layer: pp=4 -> 800/4 layers + 100 = 300 params.
    layout = ParallelLayout(nproc_per_node=4, pp=4, zero_stage=0)
    assert layout.model_state_bytes(1000, embedding_params=100) == {
        "params": 1200.0,
        "grads": 1200.0,
        "optimizer": 2400.0,
    }


def test_config_validation_reads_the_experts_of_a_moe_model():
    from tests.train.test_config import compose_cfg
    from train.config import to_config

    with pytest.raises(
        ConfigError, match=r"parallel.ep=3: ep\*etp\*pp=3\*1\*1=3 does not divide the world size 2"
    ):
        to_config(compose_cfg(["model=mixtral_tiny", "parallel.ep=3"]))
    with pytest.raises(ConfigError, match=r"parallel.ep=2: ep=2 does not divide 3 experts; try ep=1"):
        to_config(compose_cfg(["model=mixtral_tiny", "parallel.ep=2", "+model.extra.moe={num_experts: 3}"]))
