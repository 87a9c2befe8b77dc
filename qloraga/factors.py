"""The LoRA-GA factors of one layer, from its gradient: pure tensor math, no model.

The paper's formulas (shared ALGORITHM.md section 2), not PEFT's: singular values multiply nothing,
`stable` scales both factors, `random` draws disjoint index halves for A and B.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from qloraga.config import DIRECTIONS, SCALES, check_choice


def top_singular_vectors(
    grad: torch.Tensor, k: int, svd_niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `U[:, :k]` and `Vt[:k]` of `grad` in fp32: exact SVD, or randomized with `svd_niter` iterations."""
    g = grad.float()
    if svd_niter is None:
        u, _, vt = torch.linalg.svd(g, full_matrices=False)
        u, vt = u[:, :k], vt[:k]
    else:
        with seeded_rng(g.device):
            u, _, v = torch.svd_lowrank(g, q=min(2 * k, min(g.shape)), niter=svd_niter)
        u, vt = u[:, :k], v[:, :k].T
    return fix_signs(u, vt)


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


def fix_signs(u: torch.Tensor, vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the arbitrary sign of each singular pair (largest |entry| of u positive), so that a gradient
    summed in another order (another chunking, several processes, a sketch) gives the same factors."""
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return u * signs, vt * signs.T


def lora_ga_factors(
    grad: torch.Tensor,
    r: int,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
    svd_niter: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA initial factors `(A, B)`, fp32, `A` of shape (r, in) and `B` of shape (out, r).

    `grad` is dL/dW (out x in); `scaling` is lora_alpha / r; `weight` (the layer's weight) is needed
    only for `scale="weight_svd"`; `generator` seeds `direction="random"`.
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix (out x in), got shape {tuple(grad.shape)}.")
    check_rank(r, *grad.shape)
    u, vt = top_singular_vectors(grad, 2 * r, svd_niter)
    return factors_from_singular_vectors(u, vt, r, direction=direction, scale=scale, stable_gamma=stable_gamma,
                                         scaling=scaling, weight=weight, generator=generator)


def check_rank(r: int, out_features: int, in_features: int) -> None:
    if r < 1 or 2 * r > min(out_features, in_features):
        raise ValueError(
            f"r={r} needs 2r <= min(out, in) = {min(out_features, in_features)} for a "
            f"{out_features}x{in_features} layer: use r <= {min(out_features, in_features) // 2}."
        )


def factors_from_singular_vectors(
    u: torch.Tensor,
    vt: torch.Tensor,
    r: int,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA factors from the top `2r` singular vectors of the gradient (`u`: out x 2r, `vt`: 2r x in),
    however they were found (exact SVD here, a streaming sketch in `sketch.py`)."""
    check_choice("direction", direction, DIRECTIONS)
    check_choice("scale", scale, SCALES)
    if scale == "weight_svd" and weight is None:
        raise ValueError("scale='weight_svd' needs the layer's weight: pass weight=W.")
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

    if scale == "stable":
        factor = out_features**0.25 / stable_gamma**0.5
        a, b = a * factor, b * factor
    elif scale == "gd":
        a, b = a / scaling, b / scaling
    elif scale == "weight_svd":
        sw = torch.linalg.svdvals(weight.float().to(a.device)) / scaling
        factor = sw[:r].sqrt().mean()
        a, b = a * factor, b * factor
    return a.contiguous(), b.contiguous()
