"""Process-group set-up."""

from __future__ import annotations

import os

import torch.distributed as dist


def test_world_of_one_leaves_no_torchrun_variables_for_children(megatron_world1):
    # A child `python -m train` would take LOCAL_RANK for "under torchrun" and reuse a taken MASTER_PORT.
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"} & set(os.environ)


def test_megatron_config_overrides_follow_the_layout():
    from types import SimpleNamespace

    import torch

    from parallel.engines.megatron import config_overrides
    from parallel.layout import ParallelLayout

    dense = SimpleNamespace(params_dtype=torch.float32, num_moe_experts=None)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert config_overrides(ParallelLayout(nproc_per_node=1), dense, device=gpu) == {}
    # Interleaved PP: virtual stages, and the micro-batch group size __post_init__ derived from pp = 1 before.
    assert config_overrides(
        ParallelLayout(nproc_per_node=2, pp=2, vpp=2, recompute="full"), dense, device=cpu
    ) == {
        "pipeline_model_parallel_size": 2,
        "pipeline_dtype": torch.float32,
        "virtual_pipeline_model_parallel_size": 2,
        "microbatch_group_size_per_vp_stage": 2,
        "batch_p2p_comm": False,  # gloo: batched p2p gives wrong numbers (ENGINES-CPU.md)
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }
    moe = SimpleNamespace(params_dtype=torch.bfloat16, num_moe_experts=8)
    layout = ParallelLayout(nproc_per_node=4, tp=2, sp=True, ep=2, etp=2, recompute="selective")
    assert config_overrides(layout, moe, device=gpu) == {
        "expert_model_parallel_size": 2,
        "expert_tensor_parallel_size": 2,
        "recompute_granularity": "selective",
    }


def test_deepspeed_config_follows_the_layout():
    import torch

    from parallel.engines import OptimSettings
    from parallel.engines.deepspeed import ds_config
    from parallel.layout import ParallelLayout

    optim = OptimSettings(lr=1e-3, min_lr=0.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=0.5)
    layout = ParallelLayout(
        nproc_per_node=4, engine="deepspeed", zero_stage=3, offload="optimizer+param", micro_batch=2
    )
    cfg = ds_config(layout, optim=optim, grad_accum=3, bf16=True, device=torch.device("cuda", 0))
    assert cfg["train_batch_size"] == 4 * 2 * 3 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5  # never DeepSpeed's silent default of 1.0
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }
    assert cfg["bf16"] == {"enabled": True}
    z1 = ds_config(
        ParallelLayout(nproc_per_node=2, engine="deepspeed", zero_stage=1, offload="optimizer"),
        optim=optim,
        grad_accum=1,
        bf16=False,
        device=torch.device("cpu"),
    )
    assert z1["zero_optimization"] == {
        "stage": 1,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    }
