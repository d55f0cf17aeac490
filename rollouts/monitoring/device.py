"""Per-step device figures for training logs: memory in use and an MFU estimate.

Memory: the process's resident set size (`rss_mb`), and on a CUDA backend the allocator's
allocated, reserved and peak bytes (`cuda_allocated_mb`, `cuda_reserved_mb`, `cuda_peak_mb`).

MFU (model FLOPs utilisation) = achieved FLOP/s / the device's peak FLOP/s, with the usual
6 x parameters FLOPs per trained token (forward 2N, backward 4N; attention's own FLOPs left out,
so short sequences are estimated well and long ones under-estimated). The peak is the caller's
`peak_flops_per_s` when given; otherwise it is looked up for known CUDA GPUs (dense bf16 tensor
core peaks from the vendors' data sheets); on a CPU or an unknown GPU no MFU is reported rather
than a guess.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

__all__ = ["PEAK_BF16_FLOPS_PER_S", "device_metrics", "mfu_estimator"]

# Dense bf16 peaks; the first name fragment found in torch.cuda.get_device_name() wins.
PEAK_BF16_FLOPS_PER_S: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def device_metrics(device: torch.device) -> dict[str, float]:
    """Memory now, in MiB: this process's resident set (`rss_mb`), and on a CUDA device the
    allocator's tensors (`cuda_allocated_mb`), its cached blocks (`cuda_reserved_mb`) and its
    peak since the run started (`cuda_peak_mb`)."""
    figures = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda" and torch.cuda.is_initialized():
        figures["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
        figures["cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / 2**20
        figures["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def mfu_estimator(
    num_parameters: int, device: torch.device, num_devices: int = 1, peak_flops_per_s: float = 0.0
) -> Callable[[float], float] | None:
    """A function tokens/s -> MFU, or None when the device's peak is unknown.

    tokens/s is the whole step's (every rank's), so the peak is that of `num_devices` devices."""
    peak = peak_flops_per_s or _known_peak(device)
    if not peak or num_parameters <= 0:
        return None
    flops_per_token = 6.0 * num_parameters
    total_peak = peak * num_devices
    return lambda tokens_per_s: tokens_per_s * flops_per_token / total_peak


def _known_peak(device: torch.device) -> float:
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS_PER_S.items() if key in name), 0.0)
