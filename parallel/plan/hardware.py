"""The device table: peak dense tensor FLOP/s, memory and link bandwidths per accelerator kind, and budgets bought
with GPU-hours.

Peaks are DENSE (no 2:4 sparsity), per GPU, from the vendors' data sheets:
- H100 SXM5 / PCIe: NVIDIA H100 Tensor Core GPU data sheet (2023): BF16 1,979 / 1,513 TFLOPS *with sparsity*,
  i.e. 989.4 / 756 dense; FP8 twice that; TF32 494.7 / 378 dense; FP32 67 / 51. HBM3 80 GB at 3.35 TB/s (SXM),
  HBM2e 80 GB at 2.0 TB/s (PCIe). NVLink 4: 900 GB/s bidirectional per GPU (SXM); PCIe cards pair over an NVLink
  bridge at 600 GB/s.
- H200 SXM: NVIDIA H200 data sheet (2024): the H100's compute (989.4 TFLOPS BF16 dense), 141 GB HBM3e, 4.8 TB/s.
- A100 SXM 40/80 GB: NVIDIA A100 data sheet (2021): BF16 312 TFLOPS dense, TF32 156, FP32 19.5, no FP8;
  HBM2 1,555 GB/s (40 GB) / HBM2e 2,039 GB/s (80 GB); NVLink 3: 600 GB/s bidirectional.
- B200: NVIDIA HGX B200 data sheet (2024): BF16 4.5 PFLOPS sparse per GPU = 2.25 dense, FP8 4.5 dense;
  180 GB HBM3e (1.44 TB per 8-GPU board), 7.7 TB/s; NVLink 5: 1.8 TB/s bidirectional.
- MI300X: AMD Instinct MI300X data sheet (2023): BF16 1,307.4 TFLOPS dense, FP8 2,614.9; 192 GB HBM3, 5.3 TB/s;
  Infinity Fabric 7 links x 128 GB/s = 896 GB/s bidirectional aggregate per GPU.
- cpu: not a peak in any data sheet: a nominal 0.1 TFLOP/s fp32 per process (order of magnitude of one modern
  core with AVX-512 FMA), so MFU on CPU test runs is a number to compare runs with, not a hardware fraction.

Link bandwidths here are UNIDIRECTIONAL per GPU (half the data-sheet bidirectional figure), the number ring
collectives are limited by; `configs/cluster/*.yaml` may override them (intra_node_gbps, inter_node_gbps).
"""

from __future__ import annotations

from dataclasses import dataclass

from train.errors import ConfigError

T = 1e12


@dataclass(frozen=True)
class Device:
    name: str
    peak: dict[str, float]
    """Dense FLOP/s per dtype (bf16, fp16, fp8, tf32, fp32); a dtype the device lacks is absent."""
    memory_gb: float
    """Device memory in GB (1e9 bytes)."""
    hbm_tbps: float
    """Memory bandwidth, TB/s."""
    intra_node_gbps: float
    """Unidirectional GPU-to-GPU bandwidth inside a node, GB/s."""
    inter_node_gbps: float
    """Unidirectional network bandwidth per GPU of the reference system, GB/s (one 400 Gb/s NIC = 50)."""

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


def _hopper(
    name: str, bf16: float, *, tf32: float, fp32: float, mem: float, hbm: float, nvlink: float
) -> Device:
    return Device(
        name,
        {"bf16": bf16 * T, "fp16": bf16 * T, "fp8": 2 * bf16 * T, "tf32": tf32 * T, "fp32": fp32 * T},
        mem,
        hbm,
        nvlink / 2,
        50.0,  # one 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100/H200)
    )


DEVICES: dict[str, Device] = {
    "h100_sxm": _hopper("h100_sxm", 989.4, tf32=494.7, fp32=66.9, mem=80, hbm=3.35, nvlink=900),
    "h100_pcie": _hopper("h100_pcie", 756.0, tf32=378.0, fp32=51.2, mem=80, hbm=2.0, nvlink=600),
    "h200": _hopper("h200", 989.4, tf32=494.7, fp32=66.9, mem=141, hbm=4.8, nvlink=900),
    "a100": Device(  # A100 SXM 80 GB
        "a100",
        {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T},
        80,
        2.039,
        300.0,
        25.0,  # one 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100)
    ),
    "a100_40gb": Device(
        "a100_40gb",
        {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T},
        40,
        1.555,
        300.0,
        25.0,
    ),
    "b200": Device(
        "b200",
        {"bf16": 2250 * T, "fp16": 2250 * T, "fp8": 4500 * T, "tf32": 1100 * T, "fp32": 75 * T},
        180,
        7.7,
        900.0,
        50.0,
    ),
    "mi300x": Device(
        "mi300x",
        {"bf16": 1307.4 * T, "fp16": 1307.4 * T, "fp8": 2614.9 * T, "tf32": 653.7 * T, "fp32": 163.4 * T},
        192,
        5.3,
        448.0,
        50.0,
    ),
    "cpu": Device("cpu", {"fp32": 0.1 * T, "bf16": 0.1 * T}, 16, 0.05, 10.0, 1.0),
}

DTYPES = ("bf16", "fp16", "fp8", "tf32", "fp32")


def device(gpu: str, *, key: str = "cluster.gpu") -> Device:
    if gpu not in DEVICES:
        raise ConfigError(key, gpu, f"choose one of {', '.join(DEVICES)}")
    return DEVICES[gpu]


def peak_flops(gpu: str, dtype: str = "bf16") -> float:
    """Dense peak FLOP/s of one `gpu` in `dtype` (the denominator of MFU)."""
    dev = device(gpu)
    if dtype not in dev.peak:
        raise ConfigError(
            "dtype", dtype, f"{gpu} has no {dtype} tensor peak; choose one of {', '.join(dev.peak)}"
        )
    return dev.peak[dtype]


def budget_from_gpu_hours(gpu_hours: float, *, gpu: str, mfu: float, dtype: str = "bf16") -> float:
    """Training FLOPs bought by `gpu_hours` of `gpu` at model-FLOPs utilization `mfu`."""
    peak = peak_flops(gpu, dtype)
    if not 0 < mfu <= 1:
        raise ConfigError(
            "plan.mfu", mfu, "a fraction in (0, 1]; 0.35-0.5 is typical for dense bf16 training"
        )
    if not gpu_hours > 0:
        raise ConfigError("plan.gpu_hours", gpu_hours, "must be > 0")
    return gpu_hours * 3600 * peak * mfu
