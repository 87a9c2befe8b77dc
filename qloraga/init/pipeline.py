"""Initial factors (LoRA-GA or LoRA-One) for every target layer: estimate G chunk by chunk, factorise, cache."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qloraga import distributed
from qloraga.config import QLoraGAConfig
from qloraga.errors import InitOutOfMemory, TrainingDiverged
from qloraga.init.cache import FactorCache, fingerprint
from qloraga.init.chunks import chunk_budget, plan_chunks, split_chunk
from qloraga.init.factors import (
    Spectrum,
    factors_from_singular_vectors,
    layer_generator,
    lora_one_from_spectrum,
    top_singular,
)
from qloraga.init.gradient import accumulate_chunk
from qloraga.init.sketch import Sketch, sketched_singular_vectors
from qloraga.loading import dequantized_weight
from qloraga.memory import memory_kind, peak_memory_gb, reset_peak

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class InitReport:
    """What the initialisation did, for the user's summary line."""

    layers: int
    chunks: int  # passes over the gradient batches: one per chunk (exact), 1 + power_iters (sketch)
    cached_layers: int
    zero_grad_layers: list[str]
    seconds: float
    peak_memory_gb: float
    memory_kind: str
    estimator: str = "exact"
    method: str = "lora-ga"
    budget: str = ""  # how the chunks were sized (exact estimator), e.g. "budget auto: 0.41 GB (...), 3 chunk(s)"

    def summary(self) -> str:
        work = (f"{self.chunks} chunk(s) ({self.cached_layers} from cache)" if self.estimator == "exact"
                else f"{self.chunks} sketch pass(es)")
        name = {"lora-ga": "LoRA-GA", "lora-one": "LoRA-One"}[self.method]
        return (f"{name} init: {self.layers} layers, {work}, {self.seconds:.1f} s, "
                f"peak memory {self.peak_memory_gb:.2f} GiB ({self.memory_kind})"
                + (f"; {self.budget}" if self.budget else ""))


def plain_lora_factors(out_features: int, in_features: int, r: int, generator: torch.Generator):
    """PEFT's default LoRA init (Kaiming-uniform A, zero B): the fallback for a layer with no gradient."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
    a = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(out_features, r)


def factorise_layer(name: str, layer: nn.Linear, config: QLoraGAConfig,
                    source: torch.Tensor | Sketch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer's (A0, B0) from its gradient (exact estimator) or its sketch; None for a zero gradient."""
    probe = source if isinstance(source, torch.Tensor) else source.norm
    if not torch.isfinite(probe).all():
        raise TrainingDiverged(f"The estimated gradient of {name} holds NaN or inf: nothing was written. "
                                 "Check the data and the model (try fp32 compute or fewer tokens).")
    if not probe.any():
        return None
    weight = dequantized_weight(layer) if config.scale == "weight_svd" else None
    settings = dict(scale=config.scale, scaling=config.scaling, weight=weight)
    if config.method == "lora-one":  # the top-r triplets of -G
        if isinstance(source, torch.Tensor):
            spectrum = top_singular(-source, config.r, config.svd_niter)
        else:
            spectrum = Spectrum(-source.spectrum.u, source.spectrum.s, source.spectrum.vt)
        return lora_one_from_spectrum(spectrum, config.r, stable_gamma=config.lora_one_gamma, **settings)
    u, _, vt = top_singular(source, 2 * config.r, config.svd_niter) if isinstance(source, torch.Tensor) \
        else source.spectrum
    return factors_from_singular_vectors(u, vt, config.r, direction=config.direction, stable_gamma=config.stable_gamma,
                                         generator=layer_generator(config.seed, name), **settings)


def shared_factors(names: list[str], targets: dict[str, nn.Linear], config: QLoraGAConfig,
                   sources: dict[str, torch.Tensor | Sketch]) -> tuple[Factors, list[str]]:
    """Factors of some layers, computed on rank 0 and broadcast, so every rank holds the same bits, and the
    layers that had no gradient (they start as plain LoRA). `sources` is consumed as it goes."""
    chunk: Factors = {}
    zero_grad: list[str] = []
    for name in names:
        layer, source = targets[name], sources.pop(name)
        factors = factorise_layer(name, layer, config, source) if distributed.is_main() else None
        if factors is None and distributed.is_main():
            zero_grad.append(name)
            a, b = plain_lora_factors(layer.out_features, layer.in_features, config.r,
                                      layer_generator(config.seed, name))
            factors = (a.to(layer.weight.device), b.to(layer.weight.device))
        elif factors is None:  # other ranks: buffers for the broadcast
            device = layer.weight.device
            factors = (torch.empty(config.r, layer.in_features, device=device),
                       torch.empty(layer.out_features, config.r, device=device))
        chunk[name] = factors
    distributed.broadcast_([t for name in names for t in chunk[name]])
    return chunk, zero_grad


def sketch_init(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                config: QLoraGAConfig, bar: tqdm) -> tuple[Factors, list[str], int]:
    """All layers at once with the streaming estimator: `1 + power_iters` passes, no chunks, no cache."""
    sketches = sketched_singular_vectors(model, targets, batches, r=config.r, oversample=config.oversample,
                                         power_iters=config.power_iters, seed=config.seed, progress=bar,
                                         checkpointing=config.gradient_checkpointing)
    factors, zero_grad = shared_factors(list(targets), targets, config, sketches)
    return factors, zero_grad, 1 + config.power_iters


def exact_init(model: nn.Module, targets: dict[str, nn.Linear], chunks: list[list[str]], batches: Iterable[dict],
               config: QLoraGAConfig, bar: tqdm, cache: FactorCache | None) -> tuple[Factors, list[str], int]:
    """Chunk by chunk: accumulate G, factorise, cache; an out-of-memory chunk is halved and retried."""
    pending = deque(chunks)
    n_batches = len(batches) if isinstance(batches, Sized) else None
    factors: Factors = {}
    zero_grad_layers: list[str] = []
    done = 0
    while pending:
        names = pending.popleft()
        bar.set_postfix_str(f"chunk {done + 1}/{done + 1 + len(pending)}")
        try:
            grads = accumulate_chunk(model, {n: targets[n] for n in names}, batches, bar,
                                     config.gradient_checkpointing)
            grads = distributed.global_mean_(grads, n_batches or 0)
        except torch.OutOfMemoryError:
            halves = split_chunk(model, names)
            if halves is None:
                raise InitOutOfMemory("Out of memory estimating the gradient of a single decoder block: use fewer "
                                  "or shorter gradient batches (--ga-batches, --seq-len).") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tqdm.write("LoRA-GA: out of memory on a chunk; halving it and retrying", file=sys.stderr)
            pending.extendleft(reversed(halves))
            if bar.total is not None and n_batches:
                bar.total += n_batches  # one more pass than planned
            continue
        chunk, zero_grad = shared_factors(names, targets, config, grads)
        zero_grad_layers += zero_grad
        if cache and distributed.is_main():
            cache.save(chunk)
        factors.update(chunk)
        done += 1
    return factors, zero_grad_layers, done


def initial_factors(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                 config: QLoraGAConfig) -> tuple[Factors, InitReport]:
    """`{layer name: (A0, B0)}` (fp32) for every target, and a report of the work done."""
    start = time.perf_counter()
    reset_peak()
    cache = FactorCache(config.cache_dir, fingerprint(model, targets, batches, config)) \
        if config.cache_dir and config.estimator == "exact" else None
    factors: Factors = {n: f for n, f in (cache.load() if cache else {}).items() if n in targets}
    cached = len(factors)
    todo = {n: m for n, m in targets.items() if n not in factors}
    local = distributed.shard(batches)
    new: Factors = {}
    zero_grad_layers: list[str] = []
    passes = 0
    budget = chunk_budget(model, todo, local, config) if todo and config.estimator == "exact" else None
    chunks = plan_chunks(model, todo, init_memory_gb=budget.gb, chunk_blocks=config.chunk_blocks) if budget else []
    planned = 1 + config.power_iters if config.estimator == "sketch" else len(chunks)  # passes over the batches
    total = (len(local) * planned or None) if todo and isinstance(local, Sized) else None
    with tqdm(desc="LoRA-GA gradient", unit="batch", total=total, disable=not config.progress) as bar:
        if todo and config.estimator == "sketch":
            new, zero_grad_layers, passes = sketch_init(model, todo, local, config, bar)
        elif todo:
            new, zero_grad_layers, passes = exact_init(model, todo, chunks, local, config, bar, cache)
    factors.update(new)
    if zero_grad_layers:
        warnings.warn(f"{len(zero_grad_layers)} layer(s) got a zero gradient (unused by the loss), so they "
                      f"start as plain LoRA (B=0): {zero_grad_layers[:5]}", stacklevel=2)
    report = InitReport(len(targets), passes, cached, zero_grad_layers, time.perf_counter() - start,
                        peak_memory_gb(), memory_kind(), config.estimator, config.method,
                        budget.describe(len(chunks)) if budget and not config.chunk_blocks else "")
    return factors, report
