"""The megatron-core CPU shims: each one is in effect, and the engine runs a real optimizer step on CPU."""

from __future__ import annotations

import torch

from parallel import cpu
from tests.conftest import megatron_forward_backward


def test_every_shim_applies(megatron_world1):
    assert cpu.apply() == list(cpu.SHIMS)
    assert cpu.check() == dict.fromkeys(cpu.SHIMS, True)


def test_ddp_distributed_optimizer_step_on_cpu(megatron_world1):
    """DDP + DistributedOptimizer + grad clipping on CPU: the paths the type_strings, cuda_factories and
    current_device shims unblock. One AdamW step must lower the loss on a fixed batch."""
    from models.gpt import build_model
    from models.registry import resolve_arch
    from parallel import engine
    from parallel.layout import ParallelLayout

    layout = ParallelLayout(nproc_per_node=1, micro_batch=2)
    arch = resolve_arch("llama3", "tiny", num_layers=1, hidden_size=64, num_attention_heads=4, num_kv_heads=2)
    ddp = engine.wrap_ddp(build_model(arch, vocab_size=256, max_seq_length=16), layout)
    engine.configure_schedule_hooks(ddp)
    opt = engine.build_optimizer(
        ddp,
        layout=layout,
        lr=1e-2,
        min_lr=0.0,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        eps=1e-8,
        clip_grad=1.0,
        bf16=False,
    )
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))

    def step(forward_only):
        return megatron_forward_backward(ddp, opt, tokens, forward_only=forward_only)

    before = step(False)
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    assert step(True) < before
