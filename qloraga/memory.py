"""Peak memory readings: the accelerator's allocator peak, or this process's peak RSS on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    """CUDA: `max_memory_allocated` since the last reset. CPU: the process's VmHWM (peak RSS so far)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def memory_kind() -> str:
    return "GPU max allocated" if torch.cuda.is_available() else "process peak RSS"
