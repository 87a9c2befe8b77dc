"""Initial factors (LoRA-GA, LoRA-One or GoRA) for every target layer: estimate G chunk by chunk, factorise, cache.

Each layer's gradient is first reduced to a `Summary` (the top singular triplets, or `G A^T` for GoRA, and
its importance) that suffices to factorise it at any rank up to its cap. With uniform ranks a chunk's layers
are factorised at once; with `rank_allocation: gradient` the summaries wait until every chunk's importance is
known, the ranks are allocated (`ranks.py`), and then every layer is factorised: one pass per chunk either
way, the held summaries in the memory model (`chunks.held_floats`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from qloraga import distributed
from qloraga.config import QLoraGAConfig, option
from qloraga.errors import InitOutOfMemory, TrainingDiverged
from qloraga.init.cache import FactorCache, fingerprint
from qloraga.init.chunks import chunk_budget, plan_chunks, split_chunk
from qloraga.init.factors import (
    Spectrum,
    factors_from_singular_vectors,
    gora_factors,
    kaiming_a,
    layer_generator,
    lora_one_from_spectrum,
    top_singular,
)
from qloraga.init.gradient import accumulate_chunk
from qloraga.init.originals import original_weights
from qloraga.init.quant_error import QuantErrorFit, fit_fingerprint
from qloraga.init.ranks import allocate_ranks, describe_allocation, rank_cap, sensitivity, spectral_importance
from qloraga.init.sketch import Sketch, sketched_singular_vectors
from qloraga.loading import dequantized_weight
from qloraga.memory import memory_kind, peak_memory_gb, release_cache, reset_peak

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


# Each method's name as the init's summary line and progress bar print it; the web page finds the bar by it.
METHOD_NAMES = {"lora-ga": "LoRA-GA", "lora-one": "LoRA-One", "gora": "GoRA",
                "lora": "Plain LoRA (B=0)"}  # "lora": on the quantization-error fit alone (`get_qloraga_model`)


def init_bar(method: str) -> str:
    """The init's progress bar label, naming the method that runs: "LoRA-One gradient"."""
    return f"{METHOD_NAMES[method]} gradient"


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
    allocation: str = ""  # the gradient allocation's ranks (`ranks.describe_allocation`); "" when uniform
    quant_error: str = ""  # the quantization-error fit (`QuantErrorFit.describe`); "" when off

    def summary(self) -> str:
        work = (f"{self.chunks} chunk(s) ({self.cached_layers} from cache)" if self.estimator == "exact"
                else f"{self.chunks} sketch pass(es)")
        return (f"{METHOD_NAMES[self.method]} init: {self.layers} layers, {work}, {self.seconds:.1f} s, "
                f"peak memory {self.peak_memory_gb:.2f} GiB ({self.memory_kind})"
                + (f"; {self.budget}" if self.budget else "") + (f"; {self.allocation}" if self.allocation else "")
                + (f"; {self.quant_error}" if self.quant_error else ""))


class Summary(NamedTuple):
    """What the init keeps of one layer's gradient until its rank is fixed: its importance, and either the top
    singular triplets of `-G` (LoRA-One) or `G` (LoRA-GA), or `G A^T` for GoRA's random `A` of `cap` rows. Both
    are None for a layer with no gradient."""

    importance: float
    spectrum: Spectrum | None = None
    projected: torch.Tensor | None = None

    def record(self) -> dict[str, torch.Tensor]:
        """Its tensors for the factor cache."""
        out = {"importance": torch.tensor(self.importance, dtype=torch.float64)}
        if self.spectrum is not None:
            out.update(u=self.spectrum.u, s=self.spectrum.s, vt=self.spectrum.vt)
        if self.projected is not None:
            out["projected"] = self.projected
        return out

    @classmethod
    def from_record(cls, record: dict[str, torch.Tensor], device: torch.device) -> Summary:
        spectrum = Spectrum(*(record[k].to(device) for k in ("u", "s", "vt"))) if "u" in record else None
        projected = record["projected"].to(device) if "projected" in record else None
        return cls(float(record["importance"]), spectrum, projected)


def plain_lora_factors(out_features: int, in_features: int, r: int, generator: torch.Generator):
    """PEFT's default LoRA init (Kaiming-uniform A, zero B): the fallback for a layer with no gradient."""
    return kaiming_a(r, in_features, generator), torch.zeros(out_features, r)


def gora_a(name: str, layer: nn.Linear, config: QLoraGAConfig, rows: int) -> torch.Tensor:
    """GoRA's random `A` of a layer (PEFT's Kaiming-uniform), seeded by the layer's name: a layer of rank r gets
    the first r rows of its `cap`-row matrix, so `G A^T` kept at the cap serves every rank up to it."""
    return kaiming_a(rows, layer.in_features, layer_generator(config.seed, name)).to(layer.weight.device)


def estimate(source: torch.Tensor | Sketch) -> torch.Tensor:
    """The gradient itself (exact estimator) or the sketch's rank-k estimate `U S Vt` of it."""
    if isinstance(source, torch.Tensor):
        return source
    u, s, vt = source.spectrum
    return (u * s) @ vt


def summarise(name: str, layer: nn.Linear, config: QLoraGAConfig, source: torch.Tensor | Sketch,
              cap: int) -> Summary:
    """One layer's `Summary` from its gradient (exact) or sketch, enough for any rank up to `cap`."""
    probe = source if isinstance(source, torch.Tensor) else source.norm
    if not torch.isfinite(probe).all():
        raise TrainingDiverged(f"The estimated gradient of {name} holds NaN or inf: nothing was written. "
                               "Check the data and the model (try fp32 compute or fewer tokens).")
    if not probe.any():
        return Summary(0.0)
    exact = isinstance(source, torch.Tensor)
    spectrum = projected = None
    if config.method == "gora":
        projected = estimate(source).float() @ gora_a(name, layer, config, cap).T
    elif exact:  # LoRA-One: the top-r triplets of -G; LoRA-GA: the top 2r of G
        spectrum = top_singular(-source if config.method == "lora-one" else source,
                                cap if config.method == "lora-one" else 2 * cap, config.svd_niter)
    else:
        u, s, vt = source.spectrum
        spectrum = Spectrum(-u, s, vt) if config.method == "lora-one" else source.spectrum
    importance = 0.0
    if config.rank_allocation == "gradient":
        if config.rank_importance == "spectrum":
            values = spectrum.s if spectrum is not None else (
                torch.linalg.svdvals(source.float()) if exact else source.spectrum.s)
            importance = spectral_importance(values, config.r)
        else:  # GoRA's sensitivity, on the sketch's rank-k estimate of G with the sketch estimator
            importance = sensitivity(dequantized_weight(layer), estimate(source))
    return Summary(importance, spectrum, projected)


def factorise(name: str, layer: nn.Linear, config: QLoraGAConfig, summary: Summary, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer's (A0, B0) at `rank` from its summary; None for a layer with no gradient."""
    if summary.spectrum is None and summary.projected is None:
        return None
    if config.method == "gora":
        a = gora_a(name, layer, config, summary.projected.shape[1])[:rank]
        return gora_factors(summary.projected[:, :rank], a, gamma=config.gora_gamma, scaling=config.scaling)
    weight = dequantized_weight(layer) if config.scale == "weight_svd" else None
    settings = dict(scale=config.scale, scaling=config.scaling, weight=weight)
    if config.method == "lora-one":
        return lora_one_from_spectrum(summary.spectrum, rank, stable_gamma=config.lora_one_gamma, **settings)
    u, _, vt = summary.spectrum
    return factors_from_singular_vectors(u, vt, rank, direction=config.direction, stable_gamma=config.stable_gamma,
                                         generator=layer_generator(config.seed, name), **settings)


def summaries_of(names: list[str], targets: dict[str, nn.Linear], config: QLoraGAConfig,
                 sources: dict[str, torch.Tensor | Sketch]) -> dict[str, Summary]:
    """Rank 0's summaries of some layers (other ranks: none), consuming `sources` as it goes so that each
    gradient is freed once summarised."""
    out = {}
    for name in names:
        source = sources.pop(name)
        if distributed.is_main():
            out[name] = summarise(name, targets[name], config, source, rank_cap(targets[name], config))
        del source
    return out


def shared_factors(names: list[str], targets: dict[str, nn.Linear], config: QLoraGAConfig,
                   take: Callable[[str], Summary], ranks: dict[str, int]) -> tuple[Factors, list[str]]:
    """Factors of some layers at their ranks, computed on rank 0 and broadcast, so every rank holds the same
    bits, and the layers that had no gradient (they start as plain LoRA). `take(name)` hands over (and lets go
    of) a layer's summary, one layer at a time."""
    chunk: Factors = {}
    zero_grad: list[str] = []
    for name in names:
        layer, rank = targets[name], ranks[name]
        factors = factorise(name, layer, config, take(name), rank) if distributed.is_main() else None
        if factors is None and distributed.is_main():
            zero_grad.append(name)
            a, b = plain_lora_factors(layer.out_features, layer.in_features, rank,
                                      layer_generator(config.seed, name))
            factors = (a.to(layer.weight.device), b.to(layer.weight.device))
        elif factors is None:  # other ranks: buffers for the broadcast
            device = layer.weight.device
            factors = (torch.empty(rank, layer.in_features, device=device),
                       torch.empty(layer.out_features, rank, device=device))
        chunk[name] = factors
    distributed.broadcast_([t for name in names for t in chunk[name]])
    return chunk, zero_grad


class Finisher:
    """What happens to a chunk's gradients (or the sketches): uniform ranks factorise them at once and cache the
    factors; the gradient allocation writes their summaries to `store` (the init cache, or a temporary folder)
    and keeps only their importance in memory until `allocate`, which reads them back one layer at a time. So
    the summaries of finished chunks cost disk, not memory: the peak stays one chunk's accumulators."""

    def __init__(self, targets: dict[str, nn.Linear], config: QLoraGAConfig, cache: FactorCache | None,
                 store: FactorCache | None = None, fit: QuantErrorFit | None = None):
        self.targets, self.config, self.cache, self.store, self.fit = targets, config, cache, store, fit
        self.importance: dict[str, float] = {}  # gradient allocation, rank 0: every layer's so far
        self.held: dict[str, Summary] = {}  # summaries kept in memory (no store: the sketch's, all at once)
        self.stored: dict[str, Path] = {}  # summaries on disk: the file holding each
        self.factors: Factors = {}
        self.zero_grad: list[str] = []

    def resume(self) -> None:
        """The summaries a previous, interrupted init left in the store (their importance only, read now)."""
        if self.store is None:
            return
        self.stored = {n: p for n, p in self.store.record_index("summary").items() if n in self.targets}
        for name, path in self.stored.items():
            self.importance[name] = float(FactorCache.load_record(path, name)["importance"])

    def __call__(self, names: list[str], sources: dict[str, torch.Tensor | Sketch],
                 covariances: dict[str, torch.Tensor] | None = None) -> None:
        summaries = summaries_of(names, self.targets, self.config, sources)
        if self.config.rank_allocation == "gradient":
            self.importance.update({n: s.importance for n, s in summaries.items()})
            if self.store and distributed.is_main():
                path = self.store.save_records({n: summaries[n].record() for n in names}, kind="summary")
                self.stored.update(dict.fromkeys(names, path))
            else:
                self.held.update(summaries)
            return
        chunk, zero_grad = shared_factors(names, self.targets, self.config, summaries.pop,
                                          {n: self.config.r for n in names})
        if self.fit is not None:  # before the factors are cached: a cached chunk has its fit too
            self.fit(names, covariances)
        if self.cache and distributed.is_main():
            self.cache.save(chunk)
        self.factors.update(chunk)
        self.zero_grad += zero_grad

    def take(self, name: str) -> Summary:
        if name in self.held:
            return self.held.pop(name)
        device = self.targets[name].weight.device
        return Summary.from_record(FactorCache.load_record(self.stored.pop(name), name), device)

    def allocate(self, names: list[str]) -> str:
        """Gradient allocation: rank 0 allocates the ranks from every layer's importance (shared with every
        rank), then `names` are factorised at them. Returns the allocation's description."""
        ranks = None
        if distributed.is_main():
            low, _ = self.config.rank_bounds
            caps = {n: rank_cap(self.targets[n], self.config) for n in names}
            features = {n: self.targets[n].in_features + self.targets[n].out_features for n in names}
            ranks = allocate_ranks({n: self.importance[n] for n in names}, features, self.config.r,
                                   min(low, *caps.values()), caps)
        ranks = distributed.broadcast_object(ranks)
        chunk, zero_grad = shared_factors(names, self.targets, self.config, self.take, ranks)
        self.factors.update(chunk)
        self.zero_grad += zero_grad
        return describe_allocation(ranks)


def sketch_init(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                config: QLoraGAConfig, bar: tqdm, finish: Finisher) -> int:
    """All layers at once with the streaming estimator: `1 + power_iters` passes, no chunks, no cache. The
    sketch is as wide as the largest rank a layer may get."""
    width = max(rank_cap(m, config) for m in targets.values())
    sketches = sketched_singular_vectors(model, targets, batches, r=width, oversample=config.oversample,
                                         power_iters=config.power_iters, seed=config.seed, progress=bar,
                                         checkpointing=config.gradient_checkpointing)
    finish(list(targets), sketches)
    return 1 + config.power_iters


def exact_init(model: nn.Module, targets: dict[str, nn.Linear], chunks: list[list[str]], batches: Iterable[dict],
               config: QLoraGAConfig, bar: tqdm, finish: Finisher) -> int:
    """Chunk by chunk: accumulate G, then `finish` it (factorise and cache, or summarise); a chunk that runs out
    of memory (accumulating, or in its SVDs and summaries) is halved and retried."""
    pending = deque(chunks)
    n_batches = len(batches) if isinstance(batches, Sized) else None
    device = next(iter(targets.values())).weight.device

    def attempt(names: list[str]) -> bool:
        """False if the device ran out of memory anywhere in the chunk. Its halves are estimated and finished
        again: what `finish` had kept of it (the error fit's factors) is kept again, with the same values."""
        try:
            covariances = {} if finish.fit is not None else None  # X^T X from the same hooks, for the error fit
            grads = accumulate_chunk(model, {n: targets[n] for n in names}, batches, bar,
                                     config.gradient_checkpointing, covariances)
            if covariances is not None:
                distributed.global_mean_(covariances, n_batches or 0)
            finish(names, distributed.global_mean_(grads, n_batches or 0), covariances)
        except torch.OutOfMemoryError:
            return False  # the exception's frames still hold the chunk's tensors until this returns
        return True

    done = 0
    while pending:
        names = pending.popleft()
        bar.set_postfix_str(f"chunk {done + 1}/{done + 1 + len(pending)}")
        if attempt(names):
            done += 1
            continue
        release_cache(device)  # the failed chunk's tensors have no reference left
        halves = split_chunk(model, names)
        if halves is None:
            raise InitOutOfMemory("Out of memory estimating or factorising the gradient of a single decoder block: "
                                  "use fewer or shorter gradient batches (--ga-batches, --seq-len), or the "
                                  f"randomized SVD ({option('lora_ga.svd_niter')}: 4 in a --config file).")
        tqdm.write("LoRA-GA: out of memory on a chunk; halving it and retrying", file=sys.stderr)
        pending.extendleft(reversed(halves))
        if bar.total is not None and n_batches:
            bar.total += n_batches  # one more pass than planned
    return done


def initial_factors(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                 config: QLoraGAConfig, *, offsets: Factors | None = None,
                 originals: Callable[[str], torch.Tensor] | None = None) -> tuple[Factors, InitReport]:
    """`{layer name: (A0, B0)}` (fp32) for every target, and a report of the work done. Under the gradient
    allocation the layers' ranks differ (`A0` has rank rows).

    With `config.quant_error` on, `offsets` (a dict, required then) is filled with every target's frozen start
    `(A, B)`: the rank-r fit of its quantization error `W - deq(Wq)`, `W` from `originals(name)` (default: the
    checkpoint the model was read from, `originals.original_weights`)."""
    start = time.perf_counter()
    device = next(iter(targets.values())).weight.device  # the model's, not whether the machine has a GPU
    reset_peak(device)
    gradient = config.rank_allocation == "gradient"
    cache = FactorCache(config.cache_dir, fingerprint(model, targets, batches, config)) \
        if config.cache_dir and config.estimator == "exact" else None
    factors: Factors = {}
    # The gradient allocation's summaries wait on disk: in the init cache, else in a temporary folder (exact
    # estimator; the sketch's are all made at once, from sketches that are held anyway).
    spill = tempfile.mkdtemp(prefix="qloraga-summaries-") \
        if gradient and not cache and config.estimator == "exact" and distributed.is_main() else None
    fit = None
    if config.quant_error != "off":
        if offsets is None:
            raise ValueError("quant_error is on: pass offsets={} to receive the quantization-error fit's factors.")
        fit = QuantErrorFit(targets, config, originals or original_weights(model),
                            FactorCache(config.cache_dir, fit_fingerprint(cache.key, config)) if cache else None)
        fit.resume()
    finish = Finisher(targets, config, cache, (cache or FactorCache(spill, "spill")) if gradient and (cache or spill)
                      else None, fit)
    if cache and gradient:
        finish.resume()
    elif cache:
        factors = {n: f for n, f in cache.load().items() if n in targets and (fit is None or n in fit.offsets)}
    cached = len(factors) + len(finish.stored)
    todo = {n: m for n, m in targets.items() if n not in factors and n not in finish.stored}
    if gradient and distributed.active():  # every rank must know that rank 0 resumes the same layers
        todo = {n: targets[n] for n in distributed.broadcast_object(list(todo))}
    local = distributed.shard(batches)
    passes = 0
    budget = chunk_budget(model, todo, local, config) if todo and config.estimator == "exact" else None
    chunks = plan_chunks(model, todo, init_memory_gb=budget.gb, chunk_blocks=config.chunk_blocks,
                         covariance=fit is not None) if budget else []
    planned = 1 + config.power_iters if config.estimator == "sketch" else len(chunks)  # passes over the batches
    total = (len(local) * planned or None) if todo and isinstance(local, Sized) else None
    try:
        with tqdm(desc=init_bar(config.method), unit="batch", total=total, disable=not config.progress) as bar:
            if todo and config.estimator == "sketch":
                passes = sketch_init(model, todo, local, config, bar, finish)
            elif todo:
                passes = exact_init(model, todo, chunks, local, config, bar, finish)
        allocation = finish.allocate(list(targets)) if gradient else ""
    finally:
        if spill:
            shutil.rmtree(spill, ignore_errors=True)
    factors.update(finish.factors)
    release_cache(device)  # the accumulators' cached blocks: training's optimizer allocates next
    factors = {n: factors[n] for n in targets}  # the targets' order, whichever chunk or cache each came from
    zero_grad_layers = finish.zero_grad
    if zero_grad_layers:
        warnings.warn(f"{len(zero_grad_layers)} layer(s) got a zero gradient (unused by the loss), so they "
                      f"start as plain LoRA (B=0): {zero_grad_layers[:5]}", stacklevel=2)
    report = InitReport(len(targets), passes, cached, zero_grad_layers, time.perf_counter() - start,
                        peak_memory_gb(device), memory_kind(device), config.estimator, config.method,
                        budget.describe(len(chunks)) if budget and not config.chunk_blocks else "", allocation,
                        fit.describe() if fit else "")
    if fit is not None:
        offsets.update({n: fit.offsets[n] for n in targets})
    return factors, report
