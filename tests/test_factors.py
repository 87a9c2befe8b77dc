"""`lora_ga_factors` against the paper's table, recomputed here from an exact `torch.linalg.svd`."""

from __future__ import annotations

import pytest
import torch
from conftest import decaying_grad

from qloraga import lora_ga_factors
from qloraga.config import DIRECTIONS, SCALES

M, N, R = 48, 64, 4  # the shape of conftest.decaying_grad


def expected(grad, r, direction, scale, gamma, scaling, weight):
    """The table of docs/ALGORITHM.md section 1, written out independently of the library."""
    u, _, vt = torch.linalg.svd(grad.double(), full_matrices=False)
    if direction == "ArB2r":
        b, a = u[:, r:2 * r], vt[:r]
    elif direction == "A2rBr":
        b, a = u[:, :r], vt[r:2 * r]
    else:  # ArBr
        b, a = u[:, 0:2 * r:2], vt[1:2 * r:2]
    m = grad.shape[0]
    if scale == "stable":
        c = m**0.25 / gamma**0.5
        a, b = a * c, b * c
    elif scale == "gd":
        a, b = a / scaling, b / scaling
    elif scale == "weight_svd":
        sw = torch.linalg.svdvals(weight.double()) / scaling
        c = sw[:r].sqrt().mean()
        a, b = a * c, b * c
    return a, b


def align(ours: torch.Tensor, ref: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip signs of `ours` (columns if dim=0, rows if dim=1) to match `ref`: SVD signs are arbitrary."""
    signs = torch.sign((ours.double() * ref.double()).sum(dim=dim, keepdim=True))
    return ours.double() * signs


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", SCALES)
def test_factors_match_exact_svd(direction, scale):
    grad = decaying_grad().float()
    weight = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    a, b = lora_ga_factors(grad, R, direction=direction, scale=scale, stable_gamma=9.0, scaling=2.5,
                           weight=weight)
    assert a.shape == (R, N) and b.shape == (M, R)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    ea, eb = expected(grad, R, direction, scale, 9.0, 2.5, weight)
    torch.testing.assert_close(align(a, ea, 1), ea, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(align(b, eb, 0), eb, atol=1e-5, rtol=1e-4)


def matched_index(vectors: torch.Tensor, basis: torch.Tensor) -> list[int]:
    """For each column of `vectors`, the index of the basis column it equals up to sign and scale."""
    cos = (vectors / vectors.norm(dim=0)).T.double() @ basis.double()
    idx = cos.abs().argmax(dim=1)
    assert torch.allclose(cos.abs().max(dim=1).values, torch.ones(len(idx), dtype=torch.float64), atol=1e-4)
    return idx.tolist()


def test_random_direction_uses_disjoint_halves():
    grad = decaying_grad().float()
    u, _, vt = torch.linalg.svd(grad.double(), full_matrices=False)
    for seed in range(5):
        a, b = lora_ga_factors(grad, R, direction="random", scale="unit",
                               generator=torch.Generator().manual_seed(seed))
        b_idx = matched_index(b, u[:, :2 * R])
        a_idx = matched_index(a.T, vt[:2 * R].T)
        assert set(a_idx).isdisjoint(b_idx)
        assert set(a_idx) | set(b_idx) == set(range(2 * R))


def test_singular_values_multiply_nothing():
    """Scaling G by 1000 leaves the factors unchanged (PEFT multiplies B by S; the paper does not)."""
    grad = decaying_grad().float()
    a1, b1 = lora_ga_factors(grad, R)
    a2, b2 = lora_ga_factors(grad * 1000, R)
    torch.testing.assert_close(a1.abs(), a2.abs(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b1.abs(), b2.abs(), atol=1e-5, rtol=1e-4)


def test_lowrank_svd_finds_the_same_subspace():
    grad = decaying_grad().float()
    a, b = lora_ga_factors(grad, R, scale="unit", svd_niter=4)
    ea, eb = expected(grad, R, "ArB2r", "unit", 16.0, 1.0, None)
    # Compare projections (sign and rotation free): |P_ours - P_exact| small.
    torch.testing.assert_close((b @ b.T).double(), eb @ eb.T, atol=2e-2, rtol=0)
    torch.testing.assert_close((a.T @ a).double(), ea.T @ ea, atol=2e-2, rtol=0)


def first_step_cosine(grad: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scaling: float,
                      lr: float = 1e-4) -> float:
    """One SGD step of (A, B) on the loss <G, W + s B A>; cosine of the effective weight change with -G."""
    a = a0.clone().double().requires_grad_(True)
    b = b0.clone().double().requires_grad_(True)
    loss = (grad.double() * (scaling * b @ a)).sum()
    loss.backward()
    with torch.no_grad():
        a1, b1 = a - lr * a.grad, b - lr * b.grad
        delta = scaling * (b1 @ a1 - b0.double() @ a0.double())
    return torch.nn.functional.cosine_similarity(delta.flatten(), -grad.double().flatten(), dim=0).item()


def rank_bound(grad: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(grad.double())
    return (s[:k].norm() / s.norm()).item()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_first_step_reaches_the_rank_2r_bound(direction):
    grad = decaying_grad().float()
    a, b = lora_ga_factors(grad, R, direction=direction, scaling=2.0,
                           generator=torch.Generator().manual_seed(0))
    cos = first_step_cosine(grad, a, b, scaling=2.0)
    assert cos == pytest.approx(rank_bound(grad, 2 * R), abs=0.02)
    assert cos > 0.99  # this gradient is dominated by its first directions (docs/ALGORITHM.md section 1: 0.998)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"direction": "sideways"}, "direction"),
        ({"scale": "huge"}, "scale"),
        ({"scale": "weight_svd"}, "weight"),
    ],
)
def test_bad_options_raise_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_ga_factors(decaying_grad().float(), R, **kwargs)


def test_rank_too_large_names_the_limit():
    with pytest.raises(ValueError, match="r <= 24"):
        lora_ga_factors(decaying_grad().float(), 25)


def test_randomized_svd_depends_on_the_gradient_alone_and_leaves_the_rng_alone():
    """svd_niter factors are the same whatever the global RNG did before, and the RNG stream is untouched
    (a resumed or differently chunked run must reproduce a straight one to the bit)."""
    grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    a = lora_ga_factors(grad, r=4, svd_niter=4)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(7)  # something else consumed random numbers first
    b = lora_ga_factors(grad, r=4, svd_niter=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.manual_seed(123)
    lora_ga_factors(grad, r=4, svd_niter=4)
    assert torch.equal(torch.rand(3), expected_next)
