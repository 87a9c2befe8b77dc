"""One-pass streaming estimator: the top singular vectors of G = sum_t delta_t x_t^T without forming G.

`G` is linear in the data, so thin products with it accumulate from the (x, delta) pairs the hooks see:
`G P += delta^T (x P)` and `G^T Q += x^T (delta Q)`, in O((out + in) k) memory per layer, for all layers
in the same backward pass (no chunks). Pass 1 sketches both sides with Gaussian test matrices; with no
power iteration the factors come from that single pass (Tropp et al. 2017, "Practical sketching
algorithms for low-rank matrix approximation"); each further pass multiplies by G and G^T again with
the orthonormalised sketches (subspace iteration), and the final estimate is `G P P^T` for the latest
row basis P. The gradient must be deterministic across passes (dropout off, same batches).
(docs/ALGORITHM.md section 5.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from qloraga import distributed
from qloraga.init.factors import Spectrum, fix_signs, layer_generator
from qloraga.init.gradient import backward_pass


class Sketch(NamedTuple):
    """One layer's result: the top singular triplets of its gradient, and the sketch's norm (0 for a layer
    with no gradient, NaN for a non-finite one)."""

    spectrum: Spectrum
    norm: torch.Tensor


def sketch_width(r: int, oversample: int, out_features: int, in_features: int) -> int:
    return min(2 * r + oversample, out_features, in_features)


def gaussian(rows: int, cols: int, seed: int, name: str, device: torch.device) -> torch.Tensor:
    """A test matrix that is the same on every rank and in every run, for a given layer."""
    return torch.randn(rows, cols, generator=layer_generator(seed, name)).to(device)


class TestMatrices(Mapping):
    """Each layer's Gaussian test matrix, drawn again from the seed whenever it is asked for instead of being
    held for every layer through a pass: the same bits every time (`gaussian`), and only the layer whose
    product is being taken holds its matrix. `shapes`: name -> (rows, cols, device)."""

    def __init__(self, shapes: dict[str, tuple[int, int, torch.device]], seed: int, suffix: str) -> None:
        self.shapes, self.seed, self.suffix = shapes, seed, suffix

    def __getitem__(self, name: str) -> torch.Tensor:
        rows, cols, device = self.shapes[name]
        return gaussian(rows, cols, self.seed, name + self.suffix, device)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def width(self, name: str) -> int:
        return self.shapes[name][1]


def width(test: Mapping[str, torch.Tensor], name: str) -> int:
    return test.width(name) if isinstance(test, TestMatrices) else test[name].shape[1]


def orth(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m).Q


def sketch_pass(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[dict],
                right: Mapping[str, torch.Tensor], left: Mapping[str, torch.Tensor] | None, progress=None,
                checkpointing: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One pass: mean over batches of `G @ right[name]` (out x k) and, unless `left` is None (the last power
    iteration needs only `G P`), `G^T @ left[name]` (in x l). `right`, `left`: tensors or `TestMatrices`."""
    g_right = {n: torch.zeros(m.out_features, width(right, n), device=m.weight.device) for n, m in layers.items()}
    gt_left = {} if left is None else {n: torch.zeros(m.in_features, width(left, n), device=m.weight.device)
                                       for n, m in layers.items()}

    def add(name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        g_right[name].addmm_(delta.T, x @ right[name])
        if left is not None:
            gt_left[name].addmm_(x.T, delta @ left[name])

    n = backward_pass(model, layers, batches, add, progress, checkpointing)
    for sums in (g_right, gt_left):
        for t in sums.values():
            t /= n
        distributed.global_mean_(sums, n)
        distributed.broadcast_([sums[k] for k in sorted(sums)])  # identical bits on every rank
    return g_right, gt_left


def top_vectors_from_sketches(
    layers: dict[str, nn.Linear],
    sums: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    k: int,
    psi: Mapping[str, torch.Tensor] | None = None,
    right: dict[str, torch.Tensor] | None = None,
) -> dict[str, Sketch]:
    """The top `k` singular triplets per layer from the last pass's sums: after a single pass with `psi`, the
    left test matrices; after power iterations with `right`, the row bases the last pass multiplied by."""
    out = {}
    for name in layers:
        y, z = sums[0][name], sums[1].get(name)  # no G^T Q after power iterations
        if right is None:  # single pass: G ~ Q X with X solving (Psi^T Q) X = Z^T
            q = orth(y)
            x = torch.linalg.lstsq(psi[name].T @ q, z.T).solution
            u_small, s, vt = torch.linalg.svd(x, full_matrices=False)
            u = q @ u_small
        else:  # G ~ (G P) P^T
            u, s, vt_small = torch.linalg.svd(y, full_matrices=False)
            vt = vt_small @ right[name].T
        u, vt = fix_signs(u[:, :k], vt[:k])
        out[name] = Sketch(Spectrum(u, s[:k], vt), y.norm())
    return out


def sketched_singular_vectors(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict],
    *,
    r: int,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    progress=None,
    checkpointing: bool = False,
) -> dict[str, Sketch]:
    """Top-2r singular triplets (and the sketch norm) of every layer's gradient in `1 + power_iters` passes."""
    # Psi (the left test matrix) is twice as wide as the rank sought, k: the single-pass solve needs it
    # wider than Omega; with power iterations Omega is as wide, so both bases keep 2k columns. Both are drawn
    # again from the seed where they are used (TestMatrices), not held for every layer through the pass.
    omega_shapes, psi_shapes = {}, {}
    for n, m in layers.items():
        k = sketch_width(r, oversample, m.out_features, m.in_features)
        omega_shapes[n] = (m.in_features, min(2 * k, m.in_features) if power_iters else k, m.weight.device)
        psi_shapes[n] = (m.out_features, min(2 * k, m.out_features), m.weight.device)
    psi = TestMatrices(psi_shapes, seed, ".psi")
    sums = sketch_pass(model, layers, batches, TestMatrices(omega_shapes, seed, ".omega"), psi, progress,
                       checkpointing)
    right = None
    for i in range(power_iters):
        psi = None  # only a single-pass solve needs the test matrices
        right = {n: orth(sums[1][n]) for n in layers}  # row basis P from G^T Psi (then G^T Q)
        # column basis Q from G Omega (then G P); the last pass needs only G P, so no Q and no G^T Q
        left = {n: orth(sums[0][n]) for n in layers} if i < power_iters - 1 else None
        sums = None  # before the next pass allocates its own
        sums = sketch_pass(model, layers, batches, right, left, progress, checkpointing)
        del left
    return top_vectors_from_sketches(layers, sums, 2 * r, psi=psi, right=right)
