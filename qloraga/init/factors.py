"""The initial adapter factors of one layer, from its gradient: pure tensor math, no model.

LoRA-GA (the paper's formulas, docs/ALGORITHM.md section 1, not PEFT's): singular values multiply nothing,
`stable` scales both factors, `random` draws disjoint index halves for A and B; the model keeps its step-0
output through a frozen correction. LoRA-One (docs/ALGORITHM.md section 3): the top-r singular triplets of
`-G`, weighted by `sqrt(S / S_1)`, with no correction, so step 0 already carries a scaled rank-r step.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from qloraga.config import DIRECTIONS, SCALES, QLoraGAConfig, check_choice


class Spectrum(NamedTuple):
    """The top singular triplets of a gradient, in fp32, signs fixed: `u` (out x k), `s` (k), `vt` (k x in)."""

    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor


def top_singular(grad: torch.Tensor, k: int, svd_niter: int | None = None) -> Spectrum:
    """The top `k` singular triplets of `grad`: exact SVD, or randomized with `svd_niter` iterations."""
    g = grad.float()
    if svd_niter is None:
        u, s, vt = torch.linalg.svd(g, full_matrices=False)
        u, s, vt = u[:, :k], s[:k], vt[:k]
    else:
        with seeded_rng(g.device):
            u, s, v = torch.svd_lowrank(g, q=min(2 * k, min(g.shape)), niter=svd_niter)
        u, s, vt = u[:, :k], s[:k], v[:, :k].T
    u, vt = fix_signs(u, vt)
    return Spectrum(u, s, vt)


def top_singular_vectors(
    grad: torch.Tensor, k: int, svd_niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`U[:, :k]` and `Vt[:k]` of `grad` in fp32 (see `top_singular`)."""
    u, _, vt = top_singular(grad, k, svd_niter)
    return u, vt


@contextmanager
def seeded_rng(device: torch.device, seed: int = 0) -> Iterator[None]:
    """`torch.svd_lowrank` draws its test matrix from the global RNG: seed it for the call and restore it,
    so the factors depend on the gradient alone (not on chunking, resuming or what ran before) and the
    training's random stream is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from `seed` and a layer's name: the same draws for that layer on every rank, in
    every run, whatever the chunking (`random` directions, plain-LoRA fallbacks, the sketch's test matrices)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def fix_signs(u: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the arbitrary sign of each singular pair (largest |entry| of u positive), so that a gradient
    summed in another order (another chunking, several processes, a sketch) gives the same factors."""
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return u * signs, vt * signs.T


def lora_ga_factors(grad: torch.Tensor, r: int, *, svd_niter: int | None = None, **settings
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA initial factors `(A, B)`, fp32, `A` of shape (r, in) and `B` of shape (out, r).

    `grad` is dL/dW (out x in); `svd_niter` as in `top_singular`; `settings` are the keywords of
    `factors_from_singular_vectors` (`direction`, `scale`, `stable_gamma`, `scaling` = lora_alpha / r,
    `weight` for `scale="weight_svd"`, `generator` for `direction="random"`), with its defaults.
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix (out x in), got shape {tuple(grad.shape)}.")
    check_rank(r, *grad.shape)
    u, vt = top_singular_vectors(grad, 2 * r, svd_niter)
    return factors_from_singular_vectors(u, vt, r, **settings)


def check_rank(r: int, out_features: int, in_features: int, directions: int | None = None) -> None:
    """`r` must leave room for the singular directions the init uses (2r for LoRA-GA, r for LoRA-One)."""
    need = 2 * r if directions is None else directions
    if r < 1 or need > min(out_features, in_features):
        raise ValueError(
            f"r={r} needs {need // r}r <= min(out, in) = {min(out_features, in_features)} for a "
            f"{out_features}x{in_features} layer: use r <= {min(out_features, in_features) * r // need}."
        )


def factors_from_singular_vectors(
    u: torch.Tensor,
    vt: torch.Tensor,
    r: int,
    *,
    direction: str = QLoraGAConfig.direction,
    scale: str = QLoraGAConfig.scale,
    stable_gamma: float = QLoraGAConfig.stable_gamma,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA factors from the top `2r` singular vectors of the gradient (`u`: out x 2r, `vt`: 2r x in),
    however they were found (exact SVD here, a streaming sketch in `sketch.py`)."""
    check_choice("direction", direction, DIRECTIONS)
    check_choice("scale", scale, SCALES)
    out_features = u.shape[0]
    if direction == "ArB2r":
        b_idx, a_idx = torch.arange(r, 2 * r), torch.arange(0, r)
    elif direction == "A2rBr":
        b_idx, a_idx = torch.arange(0, r), torch.arange(r, 2 * r)
    elif direction == "ArBr":
        b_idx, a_idx = torch.arange(0, 2 * r, 2), torch.arange(1, 2 * r, 2)
    else:  # random: two disjoint halves of the top 2r directions
        perm = torch.randperm(2 * r, generator=generator)
        b_idx, a_idx = perm[:r], perm[r:]
    b = u[:, b_idx.to(u.device)].clone()
    a = vt[a_idx.to(vt.device)].clone()
    factor = scale_factor(scale, out_features, r, stable_gamma=stable_gamma, scaling=scaling, weight=weight)
    return (a * factor).contiguous(), (b * factor).contiguous()


def scale_factor(scale: str, out_features: int, r: int, *, stable_gamma: float, scaling: float,
                 weight: torch.Tensor | None = None) -> float | torch.Tensor:
    """The number both factors are multiplied by (the paper's scales, shared by LoRA-GA and LoRA-One)."""
    check_choice("scale", scale, SCALES)
    if scale == "stable":
        return out_features**0.25 / stable_gamma**0.5
    if scale == "gd":
        return 1.0 / scaling
    if scale == "weight_svd":
        if weight is None:
            raise ValueError("scale='weight_svd' needs the layer's weight: pass weight=W.")
        sw = torch.linalg.svdvals(weight.float()) / scaling
        return sw[:r].sqrt().mean()
    return 1.0  # unit


def lora_one_factors(
    grad: torch.Tensor,
    r: int,
    *,
    scale: str = QLoraGAConfig.scale,
    stable_gamma: float = QLoraGAConfig.lora_one_gamma,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
    svd_niter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-One initial factors `(A, B)`, fp32: the best rank-r approximation of the negative gradient.

    With `-G = U S V^T` and `c` the scale factor: `B = c U_r sqrt(S_r / S_1)`, `A = c sqrt(S_r / S_1) V_r^T`,
    so the adapter starts at `s B A = -(s c^2 / S_1) G_r`: one step of full fine-tuning restricted to the top
    r directions, whose largest singular value is `s c^2`. No offset is subtracted (LoRA-One's point).
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix (out x in), got shape {tuple(grad.shape)}.")
    check_rank(r, *grad.shape, directions=r)
    return lora_one_from_spectrum(top_singular(-grad, r, svd_niter), r, scale=scale, stable_gamma=stable_gamma,
                                  scaling=scaling, weight=weight)


def lora_one_from_spectrum(
    spectrum: Spectrum,
    r: int,
    *,
    scale: str = QLoraGAConfig.scale,
    stable_gamma: float = QLoraGAConfig.lora_one_gamma,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-One factors from the top singular triplets of `-G` (exact SVD or sketch)."""
    u, s, vt = spectrum
    root = (s[:r] / s[0]).clamp(min=0).sqrt()
    factor = scale_factor(scale, u.shape[0], r, stable_gamma=stable_gamma, scaling=scaling, weight=weight)
    return (root[:, None] * vt[:r] * factor).contiguous(), (u[:, :r] * root * factor).contiguous()


def kaiming_a(r: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default LoRA `A` (Kaiming-uniform with a = sqrt(5) on an (r, in) matrix: U(-1/sqrt(in), 1/sqrt(in)))."""
    bound = 1.0 / in_features**0.5
    return (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound


def gora_scale(gamma: float, r: int, in_features: int, scaling: float) -> float:
    """GoRA's factor on `B` (docs/ALGORITHM.md section 8): the product `s B A` is `-gamma sqrt(in / r) G A^+ A`.
    `G A^+ A` projects G on r random directions of its `in` columns, which keeps `r / in` of its squared norm
    in expectation, so the initial change's expected Frobenius norm is `gamma ||G||_F`: one step of gradient
    descent at rate gamma, compressed to rank r. `scaling` is the adapter's s = alpha / r."""
    return gamma * (in_features / r) ** 0.5 / scaling


def gora_factors(projected: torch.Tensor, a: torch.Tensor, *, gamma: float = QLoraGAConfig.gora_gamma,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GoRA's initial factors `(A, B)`, fp32, from `A` (r x in, random) and `projected = G A^T` (out x r).

    `B = -xi G A^T (A A^T)^-1` (the pseudo-inverse solve of `B A = -xi G` on A's row space, the paper's Eq. 9,
    with `xi = gora_scale`), so `s B A = -gamma sqrt(in / r) G A^+ A`. No offset is subtracted from the base:
    step 0 carries that compressed gradient step, as in the paper (and with it a 4-bit base stays as loaded).
    Only `G A^T` is needed, not G: the init keeps that for every layer while the ranks are being allocated.
    """
    a = a.float()
    r, in_features = a.shape
    gram = a @ a.T
    b = -torch.linalg.solve(gram, projected.float().T).T  # G A^T (A A^T)^-1, A A^T symmetric
    return a.contiguous(), (b * gora_scale(gamma, r, in_features, scaling)).contiguous()
