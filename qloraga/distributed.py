"""Data-parallel LoRA-GA: shard the gradient batches over ranks, sum the accumulators, share one set of factors.

Every rank must start from bit-identical adapters built from the gradient of all ranks' data: the
fp32 accumulators of a chunk are all-reduced (sum) before the SVD, rank 0 factorises, and the factors
are broadcast. With no process group (one process) every function here is a no-op. Every collective's tensor
goes to the device of the group's backend (`collective_device`): NCCL, which torchrun and `accelerate launch`
start on GPUs, takes CUDA tensors only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch
import torch.distributed as dist

from qloraga.errors import ConfigError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where the group's backend takes tensors: NCCL the current CUDA device (it has no CPU tensors), gloo
    the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def collective_(op, tensor: torch.Tensor, **kwargs) -> None:
    """`op(tensor, **kwargs)` in place (`dist.all_reduce`, `dist.broadcast`), through a copy on the backend's
    device when the tensor lives elsewhere (a CPU model under NCCL, a CUDA one under gloo)."""
    device = collective_device()
    if tensor.device == device:
        op(tensor, **kwargs)
        return
    staged = tensor.to(device)
    op(staged, **kwargs)
    tensor.copy_(staged)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank (e.g. a run folder named after the time)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


class Shard:
    """This rank's share of a re-iterable of batches: items rank, rank + world, rank + 2 world, ..."""

    def __init__(self, batches: Iterable, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator:
        return islice(iter(self.batches), self.rank, None, self.world)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.world))


def shard(batches: Iterable) -> Iterable:
    """The batches this rank processes; all of them in a single process."""
    if not active():
        return batches
    if len(batches) < world_size():
        raise ConfigError(f"{len(batches)} gradient batches for {world_size()} processes: give at least one "
                          "batch per process (raise --ga-batches).")
    return Shard(batches, rank(), world_size())


def global_mean_(grads: dict[str, torch.Tensor], local_batches: int) -> dict[str, torch.Tensor]:
    """Turn each rank's mean over its own batches into the mean over all ranks' batches, in place."""
    if not active():
        return grads
    total = torch.tensor([local_batches], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    batches = total.item()
    for name in sorted(grads):  # the same order on every rank
        grads[name].mul_(local_batches)
        collective_(dist.all_reduce, grads[name])
        grads[name].div_(batches)
    return grads


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into every rank's tensors (same shapes and order everywhere)."""
    if active():
        for t in tensors:
            collective_(dist.broadcast, t, src=0)
