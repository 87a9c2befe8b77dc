"""Peak memory readings: the accelerator's allocator peak, or this process's peak RSS on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def proc_status_gb(key: str) -> float:
    """A memory line of `/proc/self/status` in GiB (`VmHWM`: peak RSS, `VmRSS`: current RSS); NaN without it.

    Read by the process itself: `ru_maxrss` of a child inherits its parent's peak (docs/ALGORITHM.md section 6)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_memory_gb() -> float:
    """CUDA: `max_memory_allocated` since the last reset. CPU: the process's VmHWM (peak RSS so far)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return proc_status_gb("VmHWM")


def current_memory_gb() -> float:
    """CUDA: `memory_allocated` now. CPU: the process's VmRSS (resident memory now)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    return proc_status_gb("VmRSS")


def memory_kind() -> str:
    return "GPU max allocated" if torch.cuda.is_available() else "process peak RSS"


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
