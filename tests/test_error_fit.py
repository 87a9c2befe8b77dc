"""The quantization-error fit (qloraga/init/error_fit.py) against independent computations: an fp64 alternating
least-squares solve of the same weighted rank-r problem (no Cholesky, no SVD), and the weighted error measured
on the layer's own inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, make_batches, rel, sgd_step

from qloraga.init.error_fit import damped, damped_cholesky, error_fit, weighted_error


def problem(out: int = 24, inp: int = 32, tokens: int = 200, seed: int = 0):
    """A random error E and the covariance of correlated inputs X (tokens x in), H = X^T X."""
    g = torch.Generator().manual_seed(seed)
    error = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, inp, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix.T
    return error, x.T @ x, x


def als(error: torch.Tensor, h: torch.Tensor, r: int, iters: int = 3000, seed: int = 1) -> torch.Tensor:
    """The rank-r minimiser of tr((E - L) H (E - L)^T) by alternating least squares in fp64, from a random
    start: B = E H A^T (A H A^T)^-1, then A = (B^T B)^-1 B^T E (H cancels for fixed B)."""
    a = torch.randn(r, error.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(iters):
        b = torch.linalg.solve(a @ h @ a.T, (error @ h @ a.T).T).T
        a = torch.linalg.solve(b.T @ b, b.T @ error)
    return b @ a


@pytest.mark.parametrize("weighting", ["activation", "diagonal", "weight"])
def test_closed_form_matches_an_fp64_least_squares_solve(weighting):
    error, h, _ = problem()
    metric = {"activation": h, "diagonal": torch.diag(h.diagonal()), "weight": torch.eye(h.shape[0],
                                                                                        dtype=h.dtype)}[weighting]
    fit = error_fit(error.float(), 4, h=h.float(), weighting=weighting, damping=0.0)
    ours = (fit.b.double() @ fit.a.double())
    reference = als(error, metric, 4)
    assert weighted_error(error - ours, metric) == pytest.approx(weighted_error(error - reference, metric), rel=1e-4)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-3 * reference.abs().max().item())


def test_product_carries_the_adapter_scale():
    """s B A is the fit whatever alpha / r is (PEFT's LoftQ is right only at alpha = r, peft#1982)."""
    error, h, _ = problem()
    unit = error_fit(error.float(), 4, h=h.float())
    scaled = error_fit(error.float(), 4, h=h.float(), scaling=16 / 4)
    torch.testing.assert_close(4.0 * scaled.b @ scaled.a, unit.b @ unit.a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["activation", "diagonal", "weight"])
def test_predicted_recovery_is_the_measured_one(weighting):
    error, h, _ = problem()
    metric = {"activation": damped(h, 0.01), "diagonal": damped(torch.diag(h.diagonal()), 0.01),
              "weight": torch.eye(h.shape[0], dtype=h.dtype)}[weighting]
    fit = error_fit(error.float(), 6, h=h.float(), weighting=weighting, damping=0.01)
    after = weighted_error(error - (fit.b.double() @ fit.a.double()), metric)
    assert fit.recovered == pytest.approx(1 - after / weighted_error(error, metric), abs=1e-4)


def test_activation_fit_beats_diagonal_and_weight_space_on_the_inputs():
    """On the inputs themselves, ||X (E - L)^T||, the full-H fit is the best of the three, and all beat zero."""
    error, h, x = problem()
    seen = {w: float((x @ (error - (f.b.double() @ f.a.double())).T).square().sum())
            for w in ("activation", "diagonal", "weight")
            for f in [error_fit(error.float(), 4, h=h.float(), weighting=w)]}
    assert seen["activation"] < seen["diagonal"] < float((x @ error.T).square().sum())
    assert seen["activation"] < seen["weight"]


def test_singular_covariance_is_damped_until_it_factorises():
    """A layer that saw fewer tokens than features (H of low rank), or no token at all, still gets a fit."""
    error, _, x = problem(tokens=5)
    s = damped_cholesky(x.T.float() @ x.float(), 0.0)  # rank 5 of 32: undamped Cholesky fails, doubling saves it
    assert torch.isfinite(s).all()
    fit = error_fit(error.float(), 4, h=(x.T @ x).float())
    assert torch.isfinite(fit.a).all() and torch.isfinite(fit.b).all() and 0 < fit.recovered <= 1
    zero = error_fit(error.float(), 4, h=torch.zeros(32, 32))  # no input: damping * I, the weight-space fit
    plain = error_fit(error.float(), 4, weighting="weight")
    torch.testing.assert_close(zero.b @ zero.a, plain.b @ plain.a, rtol=1e-4, atol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="needs the layer's input covariance"):
        error_fit(torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="r=9"):
        error_fit(torch.ones(4, 8), 9, weighting="weight")


# ------------------------------------------------------------------------------------ on a tiny 4-bit model
def tiny_setup(path, quant_error: str, batches, **settings):
    """A fresh 4-bit load of the tiny model (fp32 compute) with LoRA-One and the given quantization-error fit."""
    from qloraga import QLoraGAConfig, get_qloraga_model, load_model

    config = QLoraGAConfig(r=4, method="lora-one", quant_error=quant_error, init_memory_gb=4.0, progress=False,
                           **settings)
    return get_qloraga_model(load_model(path, dtype=torch.float32), config, batches)


def inputs_seen(path, batches) -> dict[str, torch.Tensor]:
    """Every target layer's inputs on the real tokens of `batches`, from forward hooks on a plain 4-bit load."""
    from qloraga import load_model
    from qloraga.targets import find_target_layers

    model = load_model(path, dtype=torch.float32)
    seen: dict[str, list] = {}
    handles = [m.register_forward_hook(lambda m, args, out, n=n: seen.setdefault(n, []).append(args[0].detach()))
               for n, m in find_target_layers(model).items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    masks = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])[masks].double() for n, xs in seen.items()}


def seen_error(model, path, xs) -> float:
    """`sum_layers ||X (W - deq(Wq) - frozen)^T||^2`: the quantization error the inputs see after the init's frozen
    start (W from the checkpoint file, deq from bitsandbytes)."""
    from safetensors.torch import load_file

    from qloraga.adapters import A0_BUFFER, B0_BUFFER
    from qloraga.loading import dequantized_weight

    originals = load_file(f"{path}/model.safetensors")
    base = model.get_base_model()
    total = 0.0
    for name, x in xs.items():
        layer = base.get_submodule(name)
        error = originals[f"{name}.weight"].double() - dequantized_weight(layer.base_layer).double()
        if hasattr(layer, A0_BUFFER):  # LoRA-One's trainable start is not part of the error's fit
            error += layer.scaling["default"] * getattr(layer, B0_BUFFER).double() @ getattr(layer, A0_BUFFER).double()
        total += float((x @ error.T).square().sum())
    return total


def test_activation_fit_lowers_the_error_the_inputs_see_below_weight_space_and_zero(tiny_model_dir):
    path, batches = tiny_model_dir("llama"), make_batches(n_batches=4, batch_size=4, seq_len=24)
    xs = inputs_seen(path, batches)
    seen = {q: seen_error(tiny_setup(path, q, batches), path, xs) for q in ("off", "activation", "diagonal", "weight")}
    assert seen["activation"] < seen["weight"] < seen["off"]
    assert seen["activation"] < seen["diagonal"] < seen["off"]


def test_gradient_step_is_carried_on_top_unchanged(tiny_model_dir, tmp_path):
    """The trainable start is LoRA-One's, bit for bit (H rides the same pass, the gradient does not change);
    step 0 is the base plus the frozen fit plus that step, as PEFT computes the exported rank-2r adapter."""
    from peft import PeftModel

    from qloraga import export_adapter, load_model
    from qloraga.adapters import corrected_layers

    path, batches = tiny_model_dir("llama"), make_batches()
    plain, fitted = tiny_setup(path, "off", batches), tiny_setup(path, "activation", batches)
    layers = corrected_layers(fitted)
    assert len(layers) == 14
    for name, module in plain.named_modules():
        if name in layers:
            assert torch.equal(layers[name].lora_A["default"].weight, module.lora_A["default"].weight)
            assert torch.equal(layers[name].lora_B["default"].weight, module.lora_B["default"].weight)
    assert "quantization error: activation-weighted (X^T X) rank-4 fit" in fitted.qloraga_report.summary()
    ours = logits(fitted, batches)
    assert rel(ours, logits(plain, batches)) > 1e-4  # the fit moved the output
    out = export_adapter(fitted, tmp_path / "adapter")
    upstream = PeftModel.from_pretrained(load_model(path, dtype=torch.float32), out)
    assert rel(logits(upstream, batches), ours) < 1e-5


# ------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize(("init", "name"), [("lora-one", "LoRA-One"), ("lora", "Plain LoRA (B=0)")])
def test_cli_run_says_what_the_fit_did(tiny_model_dir, tmp_path, capsys, init, name):
    from conftest import run_cli, write_dataset

    data = write_dataset(tmp_path / "train.jsonl", "alpaca")
    assert run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--init", init, "--4bit",
                   "--quant-error", "activation", "--max-steps", "1") == 0
    out = capsys.readouterr().out
    assert f"{name} init: 14 layers" in out
    assert "quantization error: activation-weighted (X^T X) rank-4 fit, frozen, predicted to remove" in out
    assert "originals: the weights before quantization" in out
    assert "quant_error: activation" in (tmp_path / "out" / "config.yaml").read_text()


@pytest.mark.parametrize(("extra", "needles"), [
    (("--init", "lora-one"), ("--quant-error / lora_ga.quant_error", "not 4-bit", "--4bit")),
    (("--init", "lora-one", "--4bit", "--estimator", "sketch"), ("--quant-error / lora_ga.quant_error",
                                                                 "exact")),
], ids=["bf16-base", "sketch"])
def test_cli_refuses_what_has_no_error_to_fit(tiny_model_dir, tmp_path, capsys, extra, needles):
    from conftest import fails_with, run_cli, write_dataset

    data = write_dataset(tmp_path / "train.jsonl", "alpaca")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--quant-error", "activation", *extra)
    fails_with(capsys, code, *needles)


def test_prequantized_checkpoint_is_refused_by_name(prequantized_model_dir, batches):
    from qloraga import QLoraGAConfig, get_qloraga_model, load_model
    from qloraga.errors import ModelSourceError

    path = prequantized_model_dir("llama")
    config = QLoraGAConfig(r=4, method="lora-one", quant_error="activation", progress=False)
    with pytest.raises(ModelSourceError, match=r"pre-quantized bnb-4bit checkpoint.*lora_ga.quant_error"):
        get_qloraga_model(load_model(path, dtype=torch.float32), config, batches)


# ------------------------------------------------------------------------------------------------ the exports
def with_weights(path, deltas: dict[str, torch.Tensor]):
    """The unquantized checkpoint (fp32) with `deltas` added to some linear weights: an independent model of
    `W + delta` that no PEFT code touches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += delta
    return model


def trained_fit(path, batches, method: str = "lora-one"):
    """A quantization-error run's model after one SGD step, so the trained A, B differ from their start."""
    from qloraga import QLoraGAConfig, get_qloraga_model, load_model

    config = QLoraGAConfig(r=4, method=method, quant_error="activation", init_memory_gb=4.0, progress=False)
    model = get_qloraga_model(load_model(path, dtype=torch.float32), config, batches)
    sgd_step(model, batches, lr=1e-2)
    return model


def test_adapters_for_both_bases_load_in_upstream_peft(tiny_model_dir, tmp_path):
    """adapter/ on the 4-bit base reproduces the run; the adapter for the original, on the unquantized weights,
    computes W + s B A (the trained part only): the fit, which those weights never needed, is left out."""
    from peft import PeftModel

    from qloraga import export_adapter, load_model
    from qloraga.adapters import corrected_layers

    path, batches = tiny_model_dir("llama"), make_batches()
    model = trained_fit(path, batches)
    ours = logits(model, batches)
    four_bit = PeftModel.from_pretrained(load_model(path, dtype=torch.float32), export_adapter(model, tmp_path / "a"))
    assert rel(logits(four_bit, batches), ours) < 1e-5
    original = PeftModel.from_pretrained(load_model(path, load_in_4bit=False, dtype=torch.float32),
                                         export_adapter(model, tmp_path / "o", original=True))
    layers = corrected_layers(model)
    trained = {n.removeprefix("base_model.model."): m.scaling["default"] * (m.lora_B["default"].weight
                                                                             @ m.lora_A["default"].weight).detach()
               for n, m in layers.items()}
    expected = logits(with_weights(path, trained), batches)
    assert rel(logits(original, batches), expected) < 1e-5
    fitted = {n: d - m.scaling["default"] * (m.qloraga_B0 @ m.qloraga_A0)
              for (n, d), m in zip(trained.items(), layers.values(), strict=True)}
    assert rel(logits(with_weights(path, fitted), batches), expected) > 1e-3  # the fit would have moved it


def test_lora_ga_step_zero_is_the_base_plus_the_fit(tiny_model_dir, tmp_path):
    """LoRA-GA with the fit: its trainable start is plain LoRA-GA's, and step 0 is exactly the 4-bit base plus the
    fit (the correction cancels the trainable start), as upstream PEFT computes the fit alone on the 4-bit base;
    its rank-3r export reproduces it."""
    from peft import PeftModel, get_peft_model

    from qloraga import QLoraGAConfig, export_adapter, get_qloraga_model, load_model
    from qloraga.adapters import corrected_layers, lora_config

    path, batches = tiny_model_dir("llama"), make_batches()
    config = QLoraGAConfig(r=4, quant_error="activation", init_memory_gb=4.0, progress=False)
    model = get_qloraga_model(load_model(path, dtype=torch.float32), config, batches)
    plain = get_qloraga_model(load_model(path, dtype=torch.float32), QLoraGAConfig(r=4, init_memory_gb=4.0,
                                                                                   progress=False), batches)
    layers, plain_layers = corrected_layers(model), corrected_layers(plain)
    names = sorted(n.removeprefix("base_model.model.") for n in layers)
    fit_only = get_peft_model(load_model(path, dtype=torch.float32), lora_config(4, config.lora_alpha, names))
    fit_layers = dict(fit_only.named_modules())
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, plain_layers[name].lora_A["default"].weight)
        with torch.no_grad():  # the fit's rows: A0[4:], -B0[:, 4:]
            fit_layers[name].lora_A["default"].weight.copy_(layer.qloraga_A0[4:])
            fit_layers[name].lora_B["default"].weight.copy_(-layer.qloraga_B0[:, 4:])
    ours = logits(model, batches)
    assert rel(ours, logits(fit_only, batches)) < 1e-5
    assert rel(ours, logits(plain, batches)) > 1e-4
    exported = export_adapter(model, tmp_path / "a")
    assert json.loads((exported / "adapter_config.json").read_text())["r"] == 12
    upstream = PeftModel.from_pretrained(load_model(path, dtype=torch.float32), exported)
    assert rel(logits(upstream, batches), ours) < 1e-5


def test_checkpoint_adapter_keeps_the_fit(tiny_model_dir, tmp_path):
    """A checkpoint of a LoRA-GA --quant-error run exports as what was trained: rank 3r (the trained r, the
    correction's r, the fit's r), computing what the final adapter of the same step computes, on the 4-bit base;
    its adapter for the original weights (rank 2r) is the final adapter-original/'s, on the unquantized base."""
    from conftest import run_cli, write_dataset
    from peft import PeftModel

    from qloraga import load_model
    from qloraga.runs import ORIGINAL_ADAPTER, checkpoint_adapter, open_run

    path, batches = tiny_model_dir("llama"), make_batches()
    data = write_dataset(tmp_path / "train.jsonl", "alpaca")
    out = tmp_path / "out"
    assert run_cli(path, data, out, "--4bit", "--quant-error", "activation", "--max-steps", "2") == 0
    assert (out / ORIGINAL_ADAPTER / "adapter_config.json").exists()
    final = logits(PeftModel.from_pretrained(load_model(path, dtype=torch.float32), out / "adapter"), batches)
    ckpt = checkpoint_adapter(open_run(out), 2, tmp_path / "ckpt")
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 12
    assert rel(logits(PeftModel.from_pretrained(load_model(path, dtype=torch.float32), ckpt), batches), final) < 1e-5
    # For the original weights: the fit's r rows left out (rank 2r), as the final adapter-original/ computes.
    ckpt = checkpoint_adapter(open_run(out), 2, tmp_path / "ckpt-original", original=True)
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8

    def unquantized(adapter):
        model = load_model(path, load_in_4bit=False, dtype=torch.float32)
        return logits(PeftModel.from_pretrained(model, adapter), batches)

    assert rel(unquantized(ckpt), unquantized(out / ORIGINAL_ADAPTER)) < 1e-5


# ------------------------------------------------------------------------------------------- the memory model
def test_memory_model_counts_the_covariances_the_pass_allocates(tiny_model_dir, monkeypatch):
    """What a chunk's pass really allocates (its gradients and X^T X, read off the tensors) is what the memory
    model plans the chunks with, and what the dry run adds for --quant-error."""
    import qloraga.init.pipeline as pipeline
    from qloraga.cli.dryrun import estimate_memory
    from qloraga.config import RunConfig
    from qloraga.init.chunks import accumulator_bytes
    from qloraga.model_source import causal_lm_config, model_skeleton
    from qloraga.targets import find_target_layers

    path, real = tiny_model_dir("llama"), pipeline.accumulate_chunk
    allocated = []

    def measured(model, layers, *args, **kwargs):
        grads = real(model, layers, *args, **kwargs)
        covariances = args[3] if len(args) > 3 else kwargs.get("covariances")
        allocated.append((dict(layers), sum(t.nbytes for t in [*grads.values(), *covariances.values()])))
        return grads

    monkeypatch.setattr(pipeline, "accumulate_chunk", measured)
    tiny_setup(path, "activation", make_batches(), chunk_blocks=1)
    assert len(allocated) == 2
    for layers, nbytes in allocated:
        assert nbytes == sum(accumulator_bytes(m, covariance=True) for m in layers.values())
    skeleton = model_skeleton(causal_lm_config(path))
    off, on = (estimate_memory(skeleton, RunConfig(model=path, load_in_4bit=True, lora_ga={
        "r": 4, "quant_error": q, "init_memory_gb": 4.0})) for q in ("off", "activation"))
    covariance = sum(m.in_features**2 * 4 for m in find_target_layers(skeleton).values())  # one chunk: 4 GiB
    assert on.init - off.init >= covariance and on.training == off.training


def test_fit_alone_starts_plain_lora_on_the_base_plus_the_fit(tiny_model_dir):
    """step=False: the trainable start is PEFT's plain LoRA (B = 0), so step 0 is the 4-bit base plus the fit, the
    same output as LoRA-GA with the fit (whose correction cancels its own start)."""
    from qloraga import QLoraGAConfig, get_qloraga_model, load_model
    from qloraga.adapters import corrected_layers

    path, batches = tiny_model_dir("llama"), make_batches()
    settings = dict(r=4, quant_error="activation", init_memory_gb=4.0, progress=False)
    alone = get_qloraga_model(load_model(path, dtype=torch.float32), QLoraGAConfig(method="lora-one", **settings),
                              batches, step=False)
    lora_ga = get_qloraga_model(load_model(path, dtype=torch.float32), QLoraGAConfig(**settings), batches)
    assert all(not m.lora_B["default"].weight.any() for m in corrected_layers(alone).values())
    assert alone.qloraga_report.summary().startswith("Plain LoRA (B=0) init")
    assert rel(logits(alone, batches), logits(lora_ga, batches)) < 1e-5
