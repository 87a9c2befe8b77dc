"""LoRA-GA initial factors for every target layer of a model: estimate G chunk by chunk, factorise, cache."""

from __future__ import annotations

import math
import sys
import time
import warnings
import zlib
from collections import deque
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qloraga import distributed
from qloraga.cache import FactorCache, fingerprint
from qloraga.config import QLoraGAConfig
from qloraga.estimate import accumulate_chunk, plan_chunks, split_chunk
from qloraga.factors import lora_ga_factors
from qloraga.loading import dequantized_weight
from qloraga.memory import memory_kind, peak_memory_gb, reset_peak

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class InitReport:
    """What the initialisation did, for the user's summary line."""

    layers: int
    chunks: int
    cached_layers: int
    zero_grad_layers: list[str]
    seconds: float
    peak_memory_gb: float
    memory_kind: str

    def summary(self) -> str:
        return (f"LoRA-GA init: {self.layers} layers in {self.chunks} chunk(s) "
                f"({self.cached_layers} from cache), {self.seconds:.1f} s, "
                f"peak memory {self.peak_memory_gb:.2f} GiB ({self.memory_kind})")


def plain_lora_factors(out_features: int, in_features: int, r: int, generator: torch.Generator):
    """PEFT's default LoRA init (Kaiming-uniform A, zero B): the fallback for a layer with no gradient."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
    a = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(out_features, r)


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A per-layer generator: the same draw for a layer whatever the chunking."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def factorise_layer(name: str, grad: torch.Tensor, layer: nn.Linear, config: QLoraGAConfig,
                    zero_grad_layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(grad).all():
        raise FloatingPointError(f"The estimated gradient of {name} holds NaN or inf: nothing was written. "
                                 "Check the data and the model (try fp32 compute or fewer tokens).")
    generator = layer_generator(config.seed, name)
    if not grad.any():
        zero_grad_layers.append(name)
        a, b = plain_lora_factors(grad.shape[0], grad.shape[1], config.r, generator)
        return a.to(grad.device), b.to(grad.device)
    return lora_ga_factors(
        grad, config.r, direction=config.direction, scale=config.scale, stable_gamma=config.stable_gamma,
        scaling=config.scaling, weight=dequantized_weight(layer) if config.scale == "weight_svd" else None,
        svd_niter=config.svd_niter, generator=generator,
    )


def factorise_chunk(names: list[str], grads: dict[str, torch.Tensor], targets: dict[str, nn.Linear],
                    config: QLoraGAConfig, zero_grad_layers: list[str]) -> Factors:
    """Factors of one chunk, computed on rank 0 and shared, so every rank holds the same bits."""
    chunk: Factors = {}
    for name in names:
        grad = grads.pop(name)
        if distributed.is_main():
            chunk[name] = factorise_layer(name, grad, targets[name], config, zero_grad_layers)
        else:
            chunk[name] = (grad.new_empty(config.r, grad.shape[1]), grad.new_empty(grad.shape[0], config.r))
        del grad
    distributed.broadcast_([t for name in names for t in chunk[name]])
    return chunk


def lora_ga_init(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                 config: QLoraGAConfig) -> tuple[Factors, InitReport]:
    """`{layer name: (A0, B0)}` (fp32) for every target, and a report of the work done."""
    start = time.perf_counter()
    reset_peak()
    cache = FactorCache(config.cache_dir, fingerprint(model, targets, batches, config)) \
        if config.cache_dir else None
    factors: Factors = {n: f for n, f in (cache.load() if cache else {}).items() if n in targets}
    cached = len(factors)
    todo = {n: m for n, m in targets.items() if n not in factors}
    pending = deque(plan_chunks(model, todo, init_memory_gb=config.init_memory_gb,
                                chunk_blocks=config.chunk_blocks) if todo else [])
    local = distributed.shard(batches)
    n_batches = len(local) if isinstance(local, Sized) else None
    zero_grad_layers: list[str] = []
    done = 0
    with tqdm(total=n_batches * len(pending) if n_batches else None, desc="LoRA-GA gradient", unit="batch",
              disable=not config.progress) as bar:
        while pending:
            names = pending.popleft()
            bar.set_postfix_str(f"chunk {done + 1}/{done + 1 + len(pending)}")
            try:
                grads = accumulate_chunk(model, {n: todo[n] for n in names}, local, bar)
                grads = distributed.global_mean_(grads, n_batches or 0)
            except torch.OutOfMemoryError:
                halves = split_chunk(model, names)
                if halves is None:
                    raise MemoryError("Out of memory estimating the gradient of a single decoder block: use "
                                      "fewer or shorter gradient batches (--ga-batches, --seq-len).") from None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                tqdm.write("LoRA-GA: out of memory on a chunk; halving it and retrying", file=sys.stderr)
                pending.extendleft(reversed(halves))
                if bar.total is not None:
                    bar.total += n_batches
                continue
            chunk = factorise_chunk(names, grads, targets, config, zero_grad_layers)
            if cache and distributed.is_main():
                cache.save(chunk)
            factors.update(chunk)
            done += 1
    if zero_grad_layers:
        warnings.warn(f"{len(zero_grad_layers)} layer(s) got a zero gradient (unused by the loss), so they "
                      f"start as plain LoRA (B=0): {zero_grad_layers[:5]}", stacklevel=2)
    report = InitReport(len(targets), done, cached, zero_grad_layers, time.perf_counter() - start,
                        peak_memory_gb(), memory_kind())
    return factors, report
