"""LoRA-One factors against an independent SVD, its step-0 model against autograd's gradient, and the
Riemannian-preconditioned optimizers against hand-computed steps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import decaying_grad, make_batches, rel, run_cli, write_dataset
from peft import LoraConfig, get_peft_model
from reference import autograd_grads, dequantized_fp32_copy, expected_step0

from qloraga import QLoraGAConfig, get_qloraga_model, load_model
from qloraga.adapters import corrected_layers
from qloraga.init.factors import lora_one_factors
from qloraga.optim import ScaledAdamW, ScaledSGD, lora_pairs, scaled_optimizer

R = 4


@pytest.mark.parametrize("scale", ["stable", "gd", "unit"])
@pytest.mark.parametrize("svd_niter", [None, 4])
def test_lora_one_factors_are_the_scaled_rank_r_negative_gradient(scale, svd_niter):
    grad = decaying_grad().float()
    a, b = lora_one_factors(grad, R, scale=scale, stable_gamma=9.0, scaling=2.5, svd_niter=svd_niter)
    assert a.shape == (R, grad.shape[1]) and b.shape == (grad.shape[0], R)
    step0 = 2.5 * (b.double() @ a.double())
    assert rel(step0, expected_step0(grad, R, scale, 9.0, 2.5)) < (1e-5 if svd_niter is None else 1e-3)
    # Balanced factors (the same sqrt(S) on both sides): B^T B = A A^T.
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-5)


def test_lora_one_rank_needs_only_r_directions():
    grad = torch.randn(6, 10)
    lora_one_factors(grad, 6)  # r = min(out, in): fine for LoRA-One (LoRA-GA would need 2r)
    with pytest.raises(ValueError, match="use r <= 6"):
        lora_one_factors(grad, 7)


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_lora_one_step0_is_a_rank_r_gradient_step_on_the_4bit_base(tiny_model_dir, estimator):
    """No correction: each layer's effective weight at step 0 is deq(Wq) - (s c^2 / S_1) G_r, with G the
    autograd gradient of a plain fp32 copy of the dequantized model."""
    model = load_model(tiny_model_dir("llama"), dtype=torch.float32)
    batches = make_batches()
    ref = dequantized_fp32_copy(model)
    config = QLoraGAConfig(r=R, method="lora-one", adapter_dtype="float32", estimator=estimator, power_iters=2,
                           progress=False)
    peft_model = get_qloraga_model(model, config, batches)
    assert not corrected_layers(peft_model)  # plain PEFT LoRA layers: nothing subtracted
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    grads = autograd_grads(ref, list(layers), batches)
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        step0 = layer.scaling["default"] * b @ a
        want = expected_step0(grads[name], R, "stable", config.lora_one_gamma, config.scaling)
        assert rel(step0, want) < (1e-3 if estimator == "exact" else 5e-2), name


def tiny_lora(seed: int = 0, corrected: bool = False):
    """One 12 -> 10 linear layer with a rank-3 PEFT adapter (A, B random), and a batch for it."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    if corrected:  # qloraga's frozen correction, as LoRA-GA wires it
        from qloraga.adapters import attach_correction

        attach_correction(layer, layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone(), torch.float32)
    x, y = torch.randn(16, 12), torch.randn(16, 10)
    return peft_model, layer, x, y


def hand_preconditioned(layer, x, y, eps):
    """The preconditioned gradients, from autograd on a fresh copy of the factors, in fp64."""
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    w = layer.base_layer.weight.detach().double()
    out = x.double() @ (w + layer.scaling["default"] * b @ a).T + layer.base_layer.bias.detach().double()
    if hasattr(layer, "qloraga_A0"):
        out = out - layer.scaling["default"] * x.double() @ (layer.qloraga_B0.double() @ layer.qloraga_A0.double()).T
    ((out - y.double()) ** 2).mean().backward()
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    pa = torch.linalg.inv(b.T @ b + eps * eye) @ a.grad
    pb = b.grad @ torch.linalg.inv(a @ a.T + eps * eye)
    return a.detach(), b.detach(), pa, pb


def one_step(peft_model, optimizer, x, y):
    ((peft_model(x) - y) ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("corrected", [False, True])
def test_scaled_sgd_step_matches_hand_computed(corrected):
    peft_model, layer, x, y = tiny_lora(corrected=corrected)
    a0, b0, pa, pb = hand_preconditioned(layer, x, y, eps=1e-3)
    opt = ScaledSGD([p for p in peft_model.parameters() if p.requires_grad], lora_pairs(peft_model),
                    precond_eps=1e-3, lr=0.1)
    one_step(peft_model, opt, x, y)
    assert rel(layer.lora_A["default"].weight, a0 - 0.1 * pa) < 1e-5
    assert rel(layer.lora_B["default"].weight, b0 - 0.1 * pb) < 1e-5
    if corrected:  # the frozen terms did not move
        assert layer.qloraga_A0.requires_grad is False and torch.equal(layer.qloraga_A0.double(), a0)


def test_scaled_adamw_first_step_matches_hand_computed():
    """Adam's first step is `lr * g / (|g| + eps)` (bias-corrected moments), on the preconditioned g."""
    peft_model, layer, x, y = tiny_lora(seed=1)
    a0, b0, pa, pb = hand_preconditioned(layer, x, y, eps=1e-6)
    opt = ScaledAdamW([p for p in peft_model.parameters() if p.requires_grad], lora_pairs(peft_model),
                      lr=0.01, eps=1e-8, weight_decay=0.0)
    one_step(peft_model, opt, x, y)
    assert rel(layer.lora_A["default"].weight, a0 - 0.01 * pa / (pa.abs() + 1e-8)) < 1e-5
    assert rel(layer.lora_B["default"].weight, b0 - 0.01 * pb / (pb.abs() + 1e-8)) < 1e-5


def test_preconditioned_step_does_not_depend_on_how_BA_is_split():
    """The point of the preconditioner: rescaling A by k and B by 1/k (same product) gives the same
    first-order move of the product under scaled SGD, and a different one under plain SGD."""
    moves = {}
    for k in (1.0, 4.0):
        for scaled in (True, False):
            peft_model, layer, x, y = tiny_lora(seed=2)
            with torch.no_grad():
                layer.lora_A["default"].weight.mul_(k)
                layer.lora_B["default"].weight.div_(k)
            before = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().clone()
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = ScaledSGD(params, lora_pairs(peft_model), precond_eps=1e-9, lr=1e-4) if scaled \
                else torch.optim.SGD(params, lr=1e-4)
            one_step(peft_model, opt, x, y)
            moves[k, scaled] = layer.lora_B["default"].weight @ layer.lora_A["default"].weight - before
    assert rel(moves[4.0, True], moves[1.0, True]) < 1e-2
    assert rel(moves[4.0, False], moves[1.0, False]) > 0.5


def test_scaled_optimizer_needs_lora_layers():
    with pytest.raises(ValueError, match="no trainable LoRA"):
        scaled_optimizer(torch.nn.Linear(3, 3), "scaled_adamw", 1e-3)


@pytest.mark.parametrize(("init", "optim"), [("lora-one", "adamw_torch"), ("lora-one", "scaled_adamw"),
                                             ("lora-ga", "scaled_adamw"), ("lora", "scaled_sgd")])
def test_one_training_run_of_each_new_combination_on_a_4bit_model(tiny_model_dir, tmp_path, init, optim):
    """The CLI end to end (4 steps, 4-bit base): the run learns and its adapter loads in upstream PEFT (rank r
    for LoRA-One and plain LoRA, which have no correction to carry; 2r for LoRA-GA)."""
    from peft import PeftModel

    model = tiny_model_dir("llama")
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion")
    assert run_cli(model, data, tmp_path / "out", "--4bit", "--init", init, "--optim", optim, "--lr", "3e-3") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"] == 4 and results["after"]["eval_loss"] < results["before"]["eval_loss"]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == (8 if init == "lora-ga" else 4)
    loaded = PeftModel.from_pretrained(load_model(model, dtype=torch.float32), tmp_path / "out" / "adapter")
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) > 0
