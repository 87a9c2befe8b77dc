"""The rank-r fit of a layer's quantization error as its inputs see it: pure tensor math, no model.

With `E = W - deq(Wq)` (the original weight less the one the 4-bit layer computes with) and `H = X^T X` from
the layer's inputs, the adapter product `L = s B A` that minimises `||X (E - L)^T||_F^2 = ||(E - L) S||_F^2`
(`H = S S^T`) over rank r is `L = [E S]_r S^-1` (Eckart-Young in the whitened space; CLoQ, arXiv 2501.18475).
`H` is damped as PEFT's CorDA damps its covariance (`damping` times the mean of its diagonal on the
diagonal, doubled until it factorises). The diagonal of `H` alone is QERA's cheaper metric (arXiv
2410.06040); the identity is the weight-space fit (LoftQ's one-iteration SVD). The share of `||E S||^2` in
the top r singular values of `E S` says beforehand how much rank r recovers (docs/ALGORITHM.md section 9).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from qloraga.init.factors import Spectrum, top_singular

Weighting = Literal["activation", "diagonal", "weight"]
DAMPING = 0.01  # CorDA's: 1% of the mean diagonal of H
MAX_DOUBLINGS = 40


class ErrorFit(NamedTuple):
    """The fit's factors, fp32: `s * b @ a` is the rank-r product; `recovered` is the share of the (damped)
    weighted error `||E S||_F^2` it removes, predicted from the spectrum of `E S`."""

    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r
    recovered: float


def damped(h: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """`H + damping * mean(diag H) * I` (a zero H, a layer that saw no input, becomes `damping * I`)."""
    scale = h.diagonal().mean()
    scale = scale if scale > 0 else torch.ones_like(scale)
    return h + damping * scale * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def damped_cholesky(h: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular `S` with `S S^T = H + d mean(diag H) I`, `d` starting at `damping` and doubled until the
    Cholesky factorisation succeeds (fp32 rounding can leave a damped covariance numerically indefinite)."""
    h = h.float()
    for _ in range(MAX_DOUBLINGS):
        s, info = torch.linalg.cholesky_ex(damped(h, damping))
        if info.item() == 0:
            return s
        damping = 2 * damping if damping > 0 else 1e-6
    raise ValueError("The input covariance X^T X does not factorise even heavily damped: it holds NaN or inf.")


def whitened(error: torch.Tensor, h: torch.Tensor | None, weighting: Weighting, damping: float
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`E S` and `S` (a lower-triangular matrix, the square roots of the damped diagonal, or None for the
    identity of the weight-space fit)."""
    error = error.float()
    if weighting == "weight":
        return error, None
    if h is None:
        raise ValueError(f"weighting={weighting!r} needs the layer's input covariance h = X^T X.")
    if weighting == "diagonal":
        root = damped(torch.diag(h.diagonal().float()), damping).diagonal().sqrt()
        return error * root, root
    if weighting != "activation":
        raise ValueError(f"Unknown weighting {weighting!r}: choose 'activation', 'diagonal' or 'weight'.")
    s = damped_cholesky(h, damping)
    return error @ s, s


def unwhiten(vt: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """`Vt S^-1` (rows: right singular vectors of `E S` mapped back to the weight's input space)."""
    if s is None:
        return vt
    if s.dim() == 1:
        return vt / s
    return torch.linalg.solve_triangular(s.T, vt.T, upper=True).T  # (S^T)^-1 V = (Vt S^-1)^T


class Whitened(NamedTuple):
    """The top singular triplets of `E S`, the whitener `S` (see `whitened`) and `||E S||_F^2`: enough for the fit
    at any rank up to the triplets' number (`fit_at`)."""

    spectrum: Spectrum
    s: torch.Tensor | None
    total: float


def whitened_spectrum(error: torch.Tensor, k: int, *, h: torch.Tensor | None = None,
                      weighting: Weighting = "activation", damping: float = DAMPING,
                      svd_niter: int | None = None) -> Whitened:
    """`E S`'s top `k` singular triplets under the weighting (exact SVD, or randomized with `svd_niter`)."""
    if error.dim() != 2:
        raise ValueError(f"error must be a matrix (out x in), got shape {tuple(error.shape)}.")
    if not 1 <= k <= min(error.shape):
        raise ValueError(f"r={k} must be between 1 and min(out, in) = {min(error.shape)}.")
    m, s = whitened(error, h, weighting, damping)
    return Whitened(top_singular(m, k, svd_niter), s, float(m.square().sum()))


def fit_at(w: Whitened, r: int, scaling: float = 1.0) -> ErrorFit:
    """The rank-r fit from `E S`'s triplets: `B = U sqrt(S) / sqrt(s)`, `A = sqrt(S) Vt S^-1 / sqrt(s)`, balanced
    in the whitened space, so that `s B A = [E S]_r S^-1` at the adapter's scale `s = alpha / r` (`scaling`).
    Dividing by `s` is what PEFT's LoftQ forgets (peft#1982): its factors are right only when alpha = r."""
    u, sv, vt = (t[..., :r] if i == 0 else t[:r] for i, t in enumerate(w.spectrum))
    if not w.total > 0:
        return ErrorFit(torch.zeros_like(vt), torch.zeros_like(u), 0.0)
    root = (sv / scaling).sqrt()
    return ErrorFit((root[:, None] * unwhiten(vt, w.s)).contiguous(), (u * root).contiguous(),
                    float(sv.square().sum() / w.total))


def error_fit(error: torch.Tensor, r: int, *, h: torch.Tensor | None = None, weighting: Weighting = "activation",
              damping: float = DAMPING, scaling: float = 1.0, svd_niter: int | None = None) -> ErrorFit:
    """The best rank-r `L = s B A` of `error` (out x in) under the weighting, as factors whose product with the
    adapter's scale `s = alpha / r` (`scaling`) is `L` (`fit_at`)."""
    return fit_at(whitened_spectrum(error, r, h=h, weighting=weighting, damping=damping, svd_niter=svd_niter), r,
                  scaling)


def weighted_error(residual: torch.Tensor, h: torch.Tensor) -> float:
    """`||X R^T||_F^2 = tr(R H R^T)`: what the layer's inputs see of a weight error `R` (out x in)."""
    residual = residual.double()
    return float(((residual @ h.double()) * residual).sum())
