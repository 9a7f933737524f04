"""The shims megatron-core 0.16 needs to run on a CPU-only torch build (gloo), in one place.

`apply()` installs them only when no GPU is present; each shim says why in one line and `check()`
fails when one stops applying (tests/parallel/test_cpu_shims.py). Measured in
shared/reference/ENGINES-CPU.md. On a GPU none of this runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch

from parallel.fixes import rewrite_source

log = logging.getLogger(__name__)

_applied: list[str] = []


def _rng() -> None:
    # model_parallel_cuda_manual_seed and the TP RNG tracker (fork()) read/write CUDA RNG state: use the CPU generator.
    import megatron.core.tensor_parallel.random as R

    logging.getLogger(R.__name__).setLevel(logging.ERROR)  # "CPU RNG state changed within GPU RNG context"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    R._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    R._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _current_device() -> None:
    # torch.cuda.current_device() is passed as `device=` (rotary embedding, grad buffers): answer "cpu".
    torch.cuda.current_device = lambda: "cpu"


def _as_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "as_tensor",
    "linspace",
    "eye",
    "randperm",
    "empty_strided",
)


def _cuda_factories() -> None:
    # ~65 places hardcode device="cuda" (schedules.py token counts, causal masks, optimizer buffers):
    # remap it to cpu in torch's factories, and make .cuda()/.to("cuda") stay on the CPU. pin_memory=True
    # (context parallelism's RoPE slice, rope_utils.get_pos_emb_on_this_cp_rank) needs an accelerator: drop it.
    def wrap(f):
        @functools.wraps(f)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _as_cpu(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            return f(*args, **kwargs)

        return factory

    for name in _FACTORIES:
        setattr(torch, name, wrap(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    to = torch.Tensor.to

    def tensor_to(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _as_cpu(kwargs["device"])
        return to(self, *(_as_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args), **kwargs)

    torch.Tensor.to = tensor_to


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU ops are synchronous, so waiting is a no-op. A class, not a
    lambda, so annotations like `torch.cuda.Stream | None` (transformers) still evaluate."""

    def __init__(self, *a, **k): ...

    def wait_stream(self, *a, **k): ...
    def wait_event(self, *a, **k): ...
    def record_event(self, *a, **k):
        return self

    def record(self, *a, **k): ...
    def synchronize(self): ...
    def wait(self, *a, **k): ...
    def query(self):
        return True


def _cuda_streams() -> None:
    # torch.cuda.synchronize() in p2p and the checkpoint writer; streams/events in DDP and MoE dispatch.
    stream = _NoStream()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()


_TYPES = [(f"'torch.cuda.{t}'", f"'torch.{t}'") for t in ("FloatTensor", "HalfTensor", "BFloat16Tensor")]


def _type_strings() -> None:
    # clip_grads asserts grad.type() == 'torch.cuda.FloatTensor'; the distributed optimizer refuses other types.
    import megatron.core.optimizer.clip_grads as CG
    import megatron.core.optimizer.distrib_optimizer as DO
    import megatron.core.optimizer.optimizer as OPT

    rewrite_source(CG, "clip_grad_by_total_norm_fp32", _TYPES[:1])
    OPT.clip_grad_by_total_norm_fp32 = CG.clip_grad_by_total_norm_fp32
    rewrite_source(DO, "DistributedOptimizer._build_model_and_main_param_groups", _TYPES)


def _sp_norm() -> None:
    # The torch RMSNorm wrapper asserts "sequence parallel not supported"; tag its weight for the TP grad all-reduce.
    from megatron.core.transformer import torch_norm

    def __new__(
        cls,
        config,
        hidden_size,
        eps=1e-5,
        persist_layer_norm=False,
        zero_centered_gamma=False,
        normalization="LayerNorm",
    ):
        norm = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        module = norm(normalized_shape=hidden_size, eps=eps)
        for p in module.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return module

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _moe_splits() -> None:
    # The alltoall dispatcher turns split sizes into numpy only for CUDA tensors; all_to_all_single refuses
    # CPU tensors as split sizes. Convert CPU tensors too.
    import megatron.core.transformer.moe.moe_utils as MU
    import megatron.core.transformer.moe.token_dispatcher as TD

    real = MU.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return real(tensor, as_numpy=as_numpy, record_stream=record_stream)

    MU.maybe_move_tensor_to_cpu = TD.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _gloo_uneven() -> None:
    # gloo's all_gather / reduce_scatter need equal sizes; expert-TP > 1 (all-gather-v, reduce-scatter-v in the
    # alltoall dispatcher) passes uneven lists. Emulate those (pad + all_gather; all_reduce + slice); equal
    # sizes go to gloo unchanged.
    import torch.distributed as dist

    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def all_gather_v(tensor_list, tensor, group=None, async_op=False):
        shapes = [t.shape for t in tensor_list]
        if all(shape == tensor.shape for shape in shapes):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(shape[0] for shape in shapes)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        bufs = [torch.empty_like(padded) for _ in shapes]
        all_gather(bufs, padded, group=group)
        for out, buf, shape in zip(tensor_list, bufs, shapes):
            out.copy_(buf[: shape[0]])

    def reduce_scatter_v(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if all(t.shape == input_list[0].shape for t in input_list):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        flat = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(flat, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(flat[start : start + input_list[rank].numel()].view_as(output))

    all_gather_v.kiln_shim = reduce_scatter_v.kiln_shim = True
    dist.all_gather, dist.reduce_scatter = all_gather_v, reduce_scatter_v


SHIMS = {
    "rng": _rng,
    "current_device": _current_device,
    "cuda_factories": _cuda_factories,
    "cuda_streams": _cuda_streams,
    "type_strings": _type_strings,
    "sp_norm": _sp_norm,
    "moe_splits": _moe_splits,
    "gloo_uneven": _gloo_uneven,
}


def apply() -> list[str]:
    """Install every shim once when no GPU is present; return the names applied."""
    if torch.cuda.is_available() or _applied:
        return list(_applied)
    for name, shim in SHIMS.items():
        shim()
        _applied.append(name)
    log.debug("megatron-core CPU shims applied: %s", ", ".join(_applied))
    return list(_applied)


def _pins_nothing() -> bool:
    try:
        return torch.tensor([1], device="cpu", pin_memory=True).device.type == "cpu"
    except RuntimeError:  # "pin_memory=True requires a CUDA or other accelerator backend"
        return False


def check() -> dict[str, bool]:
    """Whether each shim is in effect (after apply()), by probing the behaviour it fixes."""
    import megatron.core.optimizer.clip_grads as CG
    import megatron.core.tensor_parallel.random as R
    import megatron.core.transformer.moe.moe_utils as MU
    import torch.distributed as dist
    from megatron.core.transformer import torch_norm

    return {
        "rng": R._get_cuda_rng_state().equal(torch.get_rng_state()),
        "current_device": torch.cuda.current_device() == "cpu",
        "cuda_factories": torch.zeros(1, device="cuda").device.type == "cpu" and _pins_nothing(),
        "cuda_streams": torch.cuda.synchronize() is None and torch.cuda.current_stream().query(),
        "type_strings": "torch.cuda.FloatTensor" not in inspect.getsource(CG.clip_grad_by_total_norm_fp32)
        if not hasattr(CG.clip_grad_by_total_norm_fp32, "__code__")
        else "torch.cuda.FloatTensor" not in CG.clip_grad_by_total_norm_fp32.__code__.co_consts,
        "sp_norm": "__new__" in vars(torch_norm.WrappedTorchNorm)
        and vars(torch_norm.WrappedTorchNorm)["__new__"].__module__ == __name__,
        "moe_splits": type(MU.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)).__name__
        == "ndarray",
        "gloo_uneven": getattr(dist.all_gather, "kiln_shim", False)
        and getattr(dist.reduce_scatter, "kiln_shim", False),
    }
