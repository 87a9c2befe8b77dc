"""GoRA's init and the gradient rank allocation on a 4-bit base, against independent computations: fp64
pseudo-inverses and SVDs of autograd's gradient on the dequantized fp32 copy, upstream PEFT and transformers
loading the exported adapter, llama.cpp running its GGUF, and the command line end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_batches, rel, run_cli, run_cli_interrupted, write_dataset
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from reference import autograd_grads, dequantized_fp32_copy, expected_step0
from safetensors.torch import load_file

from qloraga import QLoraGAConfig, get_qloraga_model, load_model
from qloraga.adapters import PEFT_PREFIX, corrected_layers, delta_weight
from qloraga.export import export_adapter
from qloraga.init.factors import gora_factors, kaiming_a
from qloraga.init.ranks import allocate_ranks, rank_cap
from qloraga.loading import dequantized_weight

R = 4


def test_gora_factors_against_an_fp64_pseudo_inverse():
    g = torch.Generator().manual_seed(0)
    grad, a = torch.randn(24, 40, generator=g), kaiming_a(6, 40, g)
    a0, b0 = gora_factors(grad @ a.T, a, gamma=0.1, scaling=2.0)
    assert torch.equal(a0, a)
    want = -0.1 * math.sqrt(40 / 6) * grad.double() @ torch.linalg.pinv(a.double()) @ a.double()
    assert rel(2.0 * b0.double() @ a0.double(), want) < 1e-5
    # The scale rule: over random A, the initial change's Frobenius norm is gamma ||G||_F on average.
    norms = []
    for _ in range(200):
        a = kaiming_a(6, 40, g)
        a0, b0 = gora_factors(grad @ a.T, a, gamma=0.1, scaling=2.0)
        norms.append(float((2.0 * b0 @ a0).norm() / (0.1 * grad.norm())))
    assert sum(norms) / len(norms) == pytest.approx(1.0, abs=0.05)


def allocated(tiny_model_dir, method, estimator="exact", **settings):
    """A 4-bit tiny Llama with the gradient allocation, its LoRA layers, and autograd's gradients of the
    dequantized fp32 copy on the same batches."""
    model = load_model(tiny_model_dir("llama"), dtype=torch.float32)
    batches = make_batches()
    ref = dequantized_fp32_copy(model)
    config = QLoraGAConfig(r=R, lora_alpha=8, method=method, rank_allocation="gradient", estimator=estimator,
                           power_iters=2, adapter_dtype="float32", chunk_blocks=1, progress=False, **settings)
    peft_model = get_qloraga_model(model, config, batches)
    layers = {n.removeprefix(PEFT_PREFIX): m for n, m in peft_model.named_modules()
              if isinstance(m, LoraLayer) and "default" in m.lora_A}
    ranks = {n: m.r["default"] for n, m in layers.items()}
    assert len(set(ranks.values())) > 1, ranks  # the allocation is not uniform on this model
    features = {n: m.in_features + m.out_features for n, m in layers.items()}
    budget = R * sum(features.values())
    assert 0 <= budget - sum(ranks[n] * features[n] for n in ranks) < max(features.values())
    assert all(m.scaling["default"] == pytest.approx(config.scaling) for m in layers.values())  # one s for all
    return peft_model, layers, ranks, autograd_grads(ref, list(layers), batches), config


def test_gora_step0_is_the_compressed_gradient_step_on_the_4bit_base(tiny_model_dir):
    """`s B A = -gamma sqrt(in / r_i) G A^+ A` per layer, G autograd's on the dequantized fp32 copy, A the
    layer's own random A, at the layer's allocated rank; nothing subtracted from the base."""
    peft_model, layers, ranks, grads, config = allocated(tiny_model_dir, "gora")
    assert not corrected_layers(peft_model)
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight.double()
        assert a.shape[0] == ranks[name]
        want = -config.gora_gamma * math.sqrt(a.shape[1] / ranks[name]) * grads[name].double() \
            @ torch.linalg.pinv(a) @ a
        assert rel(delta_weight(layer).double(), want) < 1e-3, name


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_lora_one_at_allocated_ranks_against_an_fp64_svd(tiny_model_dir, estimator):
    """Each layer starts at `-(s c^2 / S_1) G_{r_i}` at its own rank r_i, and the ranks are the allocation of
    GoRA's importance computed here from the dequantized weights and autograd's gradient."""
    _, layers, ranks, grads, config = allocated(tiny_model_dir, "lora-one", estimator)
    for name, layer in layers.items():
        want = expected_step0(grads[name], ranks[name], "stable", config.lora_one_gamma, config.scaling)
        assert rel(delta_weight(layer).double(), want) < (1e-3 if estimator == "exact" else 5e-2), name
    if estimator == "exact":
        importance = {n: float((dequantized_weight(m.base_layer).double() * grads[n].double()).abs().mean())
                      for n, m in layers.items()}
        low, _ = config.rank_bounds
        features = {n: m.in_features + m.out_features for n, m in layers.items()}
        assert ranks == allocate_ranks(importance, features, R, low, {n: rank_cap(m, config)
                                                                     for n, m in layers.items()})


def test_lora_ga_at_allocated_ranks_against_an_fp64_svd(tiny_model_dir):
    """A0 spans the top r_i right singular vectors of G and B0 the left ones r_i..2r_i-1 (the paper's ArB2r at
    each layer's rank), both scaled by c = m^(1/4) / sqrt(gamma); the correction keeps step 0 at the base."""
    _, layers, ranks, grads, config = allocated(tiny_model_dir, "lora-ga")
    for name, layer in layers.items():
        r = ranks[name]
        u, _, vt = torch.linalg.svd(grads[name].double(), full_matrices=False)
        c2 = layer.out_features**0.5 / config.stable_gamma
        a0, b0 = layer.qloraga_A0.double(), layer.qloraga_B0.double()
        assert a0.shape[0] == r and b0.shape[1] == r
        assert rel(a0.T @ a0, c2 * vt[:r].T @ vt[:r]) < 1e-3, name
        assert rel(b0 @ b0.T, c2 * u[:, r:2 * r] @ u[:, r:2 * r].T) < 1e-3, name
        assert float(delta_weight(layer).detach().abs().max()) == 0.0  # B A - B0 A0 = 0 exactly at step 0


def perturb(model) -> None:
    """Training's stand-in: move every adapter away from its init."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean().clamp_min(1e-3) * 0.5)


@pytest.mark.parametrize("method", ["lora-ga", "gora"])
def test_peft_and_transformers_load_the_per_layer_ranks(tiny_model_dir, tmp_path, method):
    """One standard PEFT adapter with rank_pattern and alpha_pattern (LoRA-GA's correction: 2 r_i per layer)
    that upstream PEFT and transformers' load_adapter load on a fresh 4-bit base, reproducing our outputs."""
    model, _, ranks, _, _ = allocated(tiny_model_dir, method)
    perturb(model)
    out = export_adapter(model, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    factor = 2 if method == "lora-ga" else 1
    assert config["r"] == factor * R
    assert {n: factor * k for n, k in ranks.items() if k != R} == config["rank_pattern"]
    assert all(config["alpha_pattern"][n] / k == config["lora_alpha"] / config["r"]
               for n, k in config["rank_pattern"].items())
    ids = make_batches(seed=5)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        peft_loaded = PeftModel.from_pretrained(load_model(tiny_model_dir("llama"), dtype=torch.float32), out)
        assert rel(peft_loaded(input_ids=ids).logits, want) < 1e-5
        hf = load_model(tiny_model_dir("llama"), dtype=torch.float32)
        hf.load_adapter(str(out))
        assert rel(hf(input_ids=ids).logits, want) < 1e-5


def test_llama_cpp_runs_the_per_layer_rank_gguf_adapter(tmp_path):
    """llama.cpp's adapter format has one alpha: layers of other ranks at the same s get the ratio in lora_b."""
    pytest.importorskip("llama_cpp")
    from conftest import byte_level_tokenizer, save_family
    from reference import EXACT_TOL, PROMPTS, cpp_logits, hf_logits, llama_cpp_model

    from qloraga.export.gguf import write_adapter_gguf, write_model_gguf

    model_dir = save_family("llama", tmp_path / "model")
    base = load_model(model_dir, dtype=torch.float32)
    config = QLoraGAConfig(r=R, lora_alpha=8, method="gora", rank_allocation="gradient", adapter_dtype="float32",
                           gora_gamma=1.0, progress=False)
    batches = make_batches(seed=1)
    for b in batches:
        b["input_ids"] = b["input_ids"] * 2 % 320
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    model = get_qloraga_model(base, config, batches)
    assert len({m.r["default"] for m in model.modules() if isinstance(m, LoraLayer)}) > 1
    perturb(model)
    model.eval()
    tok = byte_level_tokenizer()
    base32 = write_model_gguf(model, tok, tmp_path / "base-f32.gguf", "f32", merged=False)
    llm = llama_cpp_model(base32, lora=write_adapter_gguf(model, tmp_path / "adapter.gguf"))
    plain = llama_cpp_model(base32)
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ref = hf_logits(model, ids)
        assert float(abs(cpp_logits(llm, ids) - ref).max() / ref.std()) < EXACT_TOL
        assert float(abs(cpp_logits(plain, ids) - ref).max() / ref.std()) > 100 * EXACT_TOL  # the adapter acts


@pytest.mark.parametrize("init", ["gora", "lora-one", "lora-ga"])
def test_cli_4bit_run_with_gradient_ranks(tiny_model_dir, tmp_path, capsys, init):
    """`qloraga finetune --4bit --init X --rank-allocation gradient`: the summary says the allocation, the run's
    adapter is one PEFT adapter with rank_pattern that upstream PEFT loads, and the model learns."""

    model = tiny_model_dir("llama")
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion")
    merge = ("--merge",) if init == "lora-ga" else ()
    assert run_cli(model, data, tmp_path / "out", "--4bit", "--init", init, "--rank-allocation", "gradient",
                   *merge) == 0
    assert "ranks from the gradient: min " in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["r"] == (8 if init == "lora-ga" else 4)
    loaded = PeftModel.from_pretrained(load_model(model), tmp_path / "out" / "adapter")
    ranks = {m.r["default"] for m in loaded.modules() if isinstance(m, LoraLayer) and "default" in m.r}
    assert len(ranks) > 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    if merge:
        assert (tmp_path / "out" / "merged" / "model.safetensors").exists()


def test_cli_resume_with_gradient_ranks_gives_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """An interrupted LoRA-GA run with per-layer ranks resumes from its checkpoint (the factors' summaries
    come back from the init cache) and ends with the adapter of an uninterrupted run."""
    model = tiny_model_dir("llama")
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion")
    extra = ("--4bit", "--max-steps", "6", "--rank-allocation", "gradient")
    assert run_cli(model, data, tmp_path / "straight", *extra) == 0
    assert run_cli_interrupted(monkeypatch, model, data, tmp_path / "resumed", *extra) == 130
    assert list((tmp_path / "resumed" / "lora_ga_cache").glob("summary-*.safetensors"))
    assert run_cli(model, data, tmp_path / "resumed", *extra, "--resume") == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_summaries_wait_on_disk_not_in_memory(tiny_model_dir, monkeypatch, tmp_path):
    """Without a cache folder the gradient allocation still keeps no summary in memory between chunks: each is
    read back from a temporary folder when its layer is factorised, and the folder is gone afterwards."""
    import tempfile

    import qloraga.init.pipeline as pipeline

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    taken = []
    real = pipeline.Finisher.take
    monkeypatch.setattr(pipeline.Finisher, "take", lambda self, name: taken.append(
        (name in self.held, name in self.stored)) or real(self, name))
    config = QLoraGAConfig(r=R, method="lora-ga", rank_allocation="gradient", chunk_blocks=1, progress=False)
    get_qloraga_model(load_model(tiny_model_dir("llama"), dtype=torch.float32), config, make_batches())
    assert taken and all(stored and not held for held, stored in taken)
    assert list(tmp_path.iterdir()) == []
