"""The streaming sketch estimator against the exact one: same first step, nearly the same subspaces."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, run_cli, write_dataset
from reference import autograd_grads, dequantized_fp32_copy

from qloraga import QLoraGAConfig, load_model
from qloraga.init.factors import top_singular_vectors
from qloraga.init.pipeline import initial_factors
from qloraga.init.sketch import sketched_singular_vectors
from qloraga.targets import find_target_layers

R = 4


def first_step_cosine(grad, a, b):
    """Cosine of the first SGD step's effective weight change, -(B B^T G + G A^T A), with -G."""
    g = grad.double()
    delta = -(b.double() @ b.double().T @ g + g @ a.double().T @ a.double())
    return torch.nn.functional.cosine_similarity(delta.flatten(), -g.flatten(), dim=0).item()


def principal_cosines(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of two orthonormal bases."""
    return torch.linalg.svdvals(u1.double().T @ u2.double())


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model = load_model(tiny_model_dir("llama"), dtype=torch.float32)
    batches = make_batches(n_batches=4, batch_size=2, seq_len=16)  # ~120 tokens: G of full rank
    targets = find_target_layers(model)
    grads = autograd_grads(dequantized_fp32_copy(model), list(targets), batches)
    return model, batches, targets, grads


# Mean principal-angle cosine between sketched and exact top-2r subspaces, on a tiny random model whose
# gradient spectrum is flat (the hard case). Measured: 0.77 / 0.98 / 0.995. The default (1) meets the 0.95 goal.
FLOOR = {0: 0.7, 1: 0.95, 2: 0.98}


@pytest.mark.parametrize("power_iters", sorted(FLOOR))
def test_sketched_subspaces_match_the_exact_ones(setup, power_iters):
    model, batches, targets, grads = setup
    sketches = sketched_singular_vectors(model, targets, batches, r=R, power_iters=power_iters)
    means = []
    for name, ((u, _, vt), _) in sketches.items():
        eu, evt = top_singular_vectors(grads[name], 2 * R)
        means.append(min(principal_cosines(u, eu).mean(), principal_cosines(vt.T, evt.T).mean()).item())
    print(f"power_iters={power_iters}: mean principal-angle cosine {sum(means) / len(means):.4f}, "
          f"worst layer {min(means):.4f}")
    assert sum(means) / len(means) >= FLOOR[power_iters]


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_sketched_init_gives_the_exact_first_step(setup, direction):
    model, batches, targets, grads = setup
    exact, _ = initial_factors(model, targets, batches, QLoraGAConfig(r=R, direction=direction, progress=False))
    sketched, report = initial_factors(model, targets, batches, QLoraGAConfig(r=R, direction=direction,
                                                                        estimator="sketch", progress=False))
    assert report.chunks == 2  # 1 + power_iters passes
    for name, grad in grads.items():
        cos_exact = first_step_cosine(grad, *exact[name])
        cos_sketch = first_step_cosine(grad, *sketched[name])
        assert cos_sketch == pytest.approx(cos_exact, abs=0.02), name


def test_sketch_of_an_explicit_low_rank_matrix():
    """Without a model: feed the sketch (x, delta) pairs whose G is known, through a one-layer 'model'."""
    torch.manual_seed(0)
    out_f, in_f, tokens = 48, 64, 12
    x = torch.randn(tokens, in_f)
    delta = torch.randn(tokens, out_f)
    grad = delta.T @ x  # rank 12

    class OneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(in_f, out_f, bias=False)])

        def get_input_embeddings(self):
            return self.layers[0]

        def forward(self, input_ids, **kwargs):
            y = self.layers[0](x)

            class Out:
                loss = (y * delta).sum()

            return Out()

    model = OneLinear()
    layers = {"layers.0": model.layers[0]}
    (u, _, vt), _ = sketched_singular_vectors(model, layers, [{"input_ids": torch.zeros(1)}], r=3, oversample=6,
                                              power_iters=0)["layers.0"]
    eu, evt = top_singular_vectors(grad, 6)
    assert principal_cosines(u, eu).min() > 0.999  # rank 12 <= sketch width 12: exact
    assert principal_cosines(vt.T, evt.T).min() > 0.999


def test_cli_with_the_sketch_estimator(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion")
    assert run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--4bit", "--estimator", "sketch") == 0
    assert "2 sketch pass(es)" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_regenerated_test_matrices_and_the_lighter_last_pass_give_the_same_bits(setup):
    """The Gaussian test matrices are drawn again from the seed where they are used instead of being held
    for every layer through pass 1, and the last power iteration accumulates G P alone (G^T Q was unused):
    the factors are those of stored matrices and full passes, bit for bit."""
    from qloraga.init.sketch import TestMatrices, gaussian, orth, sketch_pass, sketch_width, top_vectors_from_sketches

    model, batches, targets, _ = setup
    omega_shapes, psi_shapes = {}, {}
    for n, m in targets.items():
        k = sketch_width(R, 8, m.out_features, m.in_features)
        omega_shapes[n] = (m.in_features, min(2 * k, m.in_features), m.weight.device)
        psi_shapes[n] = (m.out_features, min(2 * k, m.out_features), m.weight.device)
    stored = [{n: gaussian(rows, cols, 0, n + suffix, device) for n, (rows, cols, device) in shapes.items()}
              for shapes, suffix in [(omega_shapes, ".omega"), (psi_shapes, ".psi")]]
    lazy = sketch_pass(model, targets, batches, TestMatrices(omega_shapes, 0, ".omega"),
                       TestMatrices(psi_shapes, 0, ".psi"))
    sums = sketch_pass(model, targets, batches, *stored)
    for i in range(2):
        assert all(torch.equal(lazy[i][n], sums[i][n]) for n in targets)
    right = {n: orth(sums[1][n]) for n in targets}
    left = {n: orth(sums[0][n]) for n in targets}
    reference = top_vectors_from_sketches(targets, sketch_pass(model, targets, batches, right, left), 2 * R,
                                          right=right)
    new = sketched_singular_vectors(model, targets, batches, r=R, power_iters=1)
    for n in targets:
        for a, b in zip([*reference[n].spectrum, reference[n].norm], [*new[n].spectrum, new[n].norm], strict=True):
            assert torch.equal(a, b), n
