"""Memory readings: the accelerator's allocator peak, or this process's peak RSS on a CPU.

Each reading is about a device, the device of the weights it concerns: a model on the CPU of a machine
with a GPU is measured as a CPU model. `device=None` (the benchmarks' whole-process readings) means this
process's GPU where there is one."""

from __future__ import annotations

from pathlib import Path

import torch


def on_cuda(device: torch.device | None) -> bool:
    return torch.cuda.is_available() if device is None else device.type == "cuda"


def reset_peak(device: torch.device | None = None) -> None:
    if on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def release_cache(device: torch.device | None) -> None:
    """Hand the CUDA caching allocator's unused blocks back to the device (after the init: the training's
    paged optimizer then finds them free). Call it where the freed tensors have no reference left."""
    if on_cuda(device):
        torch.cuda.empty_cache()


def proc_status_gb(key: str) -> float:
    """A memory line of `/proc/self/status` in GiB (`VmHWM`: peak RSS, `VmRSS`: current RSS); NaN without it.

    Read by the process itself: `ru_maxrss` of a child inherits its parent's peak (docs/ALGORITHM.md section 6)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_memory_gb(device: torch.device | None = None) -> float:
    """CUDA: `max_memory_allocated` since the last reset. CPU: the process's VmHWM (peak RSS so far)."""
    if on_cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return proc_status_gb("VmHWM")


def current_memory_gb(device: torch.device | None = None) -> float:
    """CUDA: `memory_allocated` now. CPU: the process's VmRSS (resident memory now)."""
    if on_cuda(device):
        return torch.cuda.memory_allocated(device) / 2**30
    return proc_status_gb("VmRSS")


def memory_kind(device: torch.device | None = None) -> str:
    return "GPU max allocated" if on_cuda(device) else "process peak RSS"


def free_memory_bytes(device: torch.device) -> int:
    """What the device can still give this process: CUDA `mem_get_info` free bytes plus what torch's caching
    allocator holds unused; on a CPU, `MemAvailable` of /proc/meminfo (0 where unreadable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
