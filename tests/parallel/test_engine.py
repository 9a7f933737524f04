"""Process-group set-up."""

from __future__ import annotations

import os

import torch.distributed as dist


def test_world_of_one_leaves_no_torchrun_variables_for_children(megatron_world1):
    # A child `python -m train` would take LOCAL_RANK for "under torchrun" and reuse a taken MASTER_PORT.
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert not {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"} & set(os.environ)


def test_megatron_model_kwargs_follow_the_layout():
    import torch

    from parallel.engines.megatron import config_overrides, stage_kwargs
    from parallel.layout import ParallelLayout

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert config_overrides(ParallelLayout(nproc_per_node=1), device=gpu) == {}
    layout = ParallelLayout(nproc_per_node=2, pp=2, vpp=2, recompute="full")
    assert stage_kwargs(layout, vp_stage=1, device=cpu) == {
        "pp": 2,
        "vpp": 2,
        "vp_stage": 1,
        "ep": 1,
        "etp": 1,
        "config_overrides": {
            "batch_p2p_comm": False,  # gloo: batched p2p gives wrong numbers (ENGINES-CPU.md)
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
    }
    moe = ParallelLayout(nproc_per_node=4, tp=2, sp=True, ep=2, etp=2, recompute="selective")
    assert stage_kwargs(moe, vp_stage=None, device=gpu) == {
        "pp": 1,
        "vpp": None,
        "vp_stage": None,
        "ep": 2,
        "etp": 2,
        "config_overrides": {"recompute_granularity": "selective"},
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


def test_out_of_memory_names_stage_rank_measured_and_planned():
    import re

    import torch

    from models.registry import resolve_arch
    from parallel.engines import out_of_memory_message
    from parallel.layout import ParallelLayout
    from parallel.plan.memory import Layout, memory_per_gpu

    arch = resolve_arch("llama3", "8B")
    layout = ParallelLayout(nproc_per_node=8, tp=2, micro_batch=4, recompute="selective")
    msg = out_of_memory_message(
        stage="base",
        layout=layout,
        arch=arch,
        vocab_size=128256,
        seq_length=8192,
        micro_batches=8,
        device=torch.device("cpu"),
    )
    plan = memory_per_gpu(
        arch,
        Layout(tp=2, dp=4, micro_batch=4, recompute="selective"),
        vocab_size=128256,
        seq_length=8192,
        num_microbatches=8,
        precision="fp32",
        kernels="local",
    )
    assert msg.startswith("out of memory in stage 'base' on rank 0 (cpu): measured ")
    assert re.search(r"measured \d+\.\d\d GiB resident; the planner estimated", msg)
    assert f"the planner estimated {plan.total / 2**30:.2f} GiB per GPU" in msg
    assert f"weights {plan.weights / 2**30:.2f}" in msg and "tp=2 pp=1 dp=4 micro_batch=4" in msg
    assert "Lower parallel.micro_batch" in msg
