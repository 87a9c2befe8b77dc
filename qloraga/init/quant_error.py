"""The quantization-error fit of each target layer, chunk by chunk beside the gradient (issue 26).

Each chunk's pass accumulates `H = X^T X` with the gradient (`gradient.accumulate_chunk`); once the chunk's
gradient factors are made, rank 0 fits every layer's error `E = W - deq(Wq)` (`W` read one layer at a time,
`originals.py`) under `H` (`error_fit.py`), frees `H`, and broadcasts the factors. They are the frozen start
the adapters compute on top of (`adapters.wire_adapters`), kept in the init cache beside the chunk's factors.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable

import torch
from torch import nn

from qloraga import distributed
from qloraga.config import QLoraGAConfig
from qloraga.init.cache import FactorCache
from qloraga.init.error_fit import error_fit
from qloraga.loading import dequantized_weight

KIND = "quant-error"  # the cache files' kind
WEIGHTING = {"activation": "activation-weighted (X^T X)", "diagonal": "diagonal-weighted (diag X^T X)",
             "weight": "weight-space"}


def fit_fingerprint(factors_key: str, config: QLoraGAConfig) -> str:
    """The cache key of the fits: the gradient factors' (model, data, settings) and the fit's own settings."""
    return hashlib.sha256(f"{factors_key}\0{config.quant_error}\0{config.quant_error_damping}".encode()).hexdigest()


class QuantErrorFit:
    """Every target's frozen quantization-error start `(A, B)` (`offsets`), fitted chunk by chunk (`__call__`),
    or read back from the cache (`resume`); `recovered`: each layer's predicted share of its weighted error."""

    def __init__(self, targets: dict[str, nn.Linear], config: QLoraGAConfig,
                 originals: Callable[[str], torch.Tensor], cache: FactorCache | None = None):
        self.targets, self.config, self.originals, self.cache = targets, config, originals, cache
        self.offsets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recovered: dict[str, float] = {}

    def resume(self) -> None:
        """The fits an interrupted init cached (rank 0's bits on every rank: each reads the same files)."""
        if self.cache is None:
            return
        found = FactorCache.records_by_fingerprint(self.cache.directory, KIND).get(self.cache.key, {})
        for name, record in found.items():
            if name in self.targets and {"A", "B", "recovered"} <= set(record):
                device = self.targets[name].weight.device
                self.offsets[name] = (record["A"].to(device), record["B"].to(device))
                self.recovered[name] = float(record["recovered"])

    def layer(self, name: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's fit (rank 0): `E = W - deq(Wq)` in fp32 on the layer's device, then `error_fit`."""
        layer = self.targets[name]
        error = self.originals(name).to(layer.weight.device, torch.float32) - dequantized_weight(layer).float()
        fit = error_fit(error, self.config.r, h=h, weighting=self.config.quant_error,
                        damping=self.config.quant_error_damping, scaling=self.config.scaling,
                        svd_niter=self.config.svd_niter)
        self.recovered[name] = fit.recovered
        return fit.a, fit.b

    def __call__(self, names: list[str], covariances: dict[str, torch.Tensor]) -> None:
        """Fit a finished chunk's layers (consuming their covariances), share rank 0's factors, cache them."""
        chunk = {}
        for name in names:
            h = covariances.pop(name)
            layer = self.targets[name]
            if distributed.is_main():
                chunk[name] = self.layer(name, h)
            else:
                chunk[name] = (torch.empty(self.config.r, layer.in_features, device=layer.weight.device),
                               torch.empty(layer.out_features, self.config.r, device=layer.weight.device))
            del h
        distributed.broadcast_([t for name in names for t in chunk[name]])
        if self.cache and distributed.is_main():
            self.cache.save_records({n: {"A": a, "B": b, "recovered": torch.tensor(self.recovered[n],
                                                                                 dtype=torch.float64)}
                                     for n, (a, b) in chunk.items()}, kind=KIND)
        self.offsets.update(chunk)

    def describe(self) -> str:
        """The summary line's part: the fit, and the share of the weighted error it is predicted to remove."""
        shares = list(self.recovered.values())
        said = (f", predicted to remove {statistics.mean(shares):.0%} of the {self.config.quant_error}-weighted "
                f"error (layers {min(shares):.0%}-{max(shares):.0%})") if shares else ""
        source = getattr(self.originals, "source", "")
        return (f"quantization error: {WEIGHTING[self.config.quant_error]} rank-{self.config.r} fit, frozen{said}"
                + (f"; originals: {source}" if source else ""))
