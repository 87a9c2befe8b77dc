"""Export round trips through upstream PEFT and transformers, after a few training steps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_TARGETS, make_batches, rel
from peft import PeftModel
from safetensors.torch import load_file
from test_adapters import logits
from transformers import AutoModelForCausalLM

from qloraga import QLoraGAConfig, export_adapter, export_merged, get_qloraga_model, load_model
from qloraga.adapters import corrected_layers
from qloraga.loading import dequantized_weight


def trained_model(path, load_in_4bit=True, steps=3, **config):
    batches = make_batches()
    model = get_qloraga_model(load_model(path, load_in_4bit=load_in_4bit),
                              QLoraGAConfig(r=4, progress=False, **config), batches)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, batches


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_adapter_round_trip_through_upstream_peft(tiny_model_dir, tmp_path, load_in_4bit):
    path = tiny_model_dir("llama")
    model, batches = trained_model(path, load_in_4bit)
    ours, base = logits(model, batches), logits(load_model(path, load_in_4bit=load_in_4bit), batches)
    assert rel(ours, base) > 1e-2  # training moved the model: the round trip is not vacuous
    out = export_adapter(model, tmp_path / "adapter")

    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 32)
    assert set(config["target_modules"]) == FAMILY_TARGETS["llama"]
    tensors = load_file(out / "adapter_model.safetensors")
    for name, layer in corrected_layers(model).items():
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        assert a.shape == (8, layer.in_features) and b.shape == (layer.out_features, 8)
        torch.testing.assert_close(a[4:], layer.qloraga_A0.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(b[:, 4:], -layer.qloraga_B0.cpu(), rtol=0, atol=0)

    # Upstream PEFT on a freshly loaded base: with bf16 adapters it is the very same computation ...
    fresh = PeftModel.from_pretrained(load_model(path, load_in_4bit=load_in_4bit), out,
                                      autocast_adapter_dtype=False)
    assert rel(logits(fresh, batches), ours) < 1e-6
    # ... and with PEFT's default fp32 upcast of adapters, the same model up to bf16 rounding.
    upcast = PeftModel.from_pretrained(load_model(path, load_in_4bit=load_in_4bit), out)
    assert rel(logits(upcast, batches), ours) < 2e-2


def test_merged_export_folds_in_the_update(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    model, batches = trained_model(path)
    ours = logits(model, batches)
    out = export_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    layer = corrected_layers(model)["base_model.model.model.layers.1.mlp.up_proj"]
    expected = dequantized_weight(layer.get_base_layer()).float() + layer.scaling["default"] * (
        layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
        - layer.qloraga_B0.float() @ layer.qloraga_A0.float())
    torch.testing.assert_close(merged.model.layers[1].mlp.up_proj.weight.float(), expected,
                               rtol=1e-2, atol=1e-3)  # one bf16 rounding
    assert rel(logits(merged, batches), ours) < 3e-2


def test_merged_keyword_still_writes_a_merged_model_with_a_deprecation(tiny_model_dir, tmp_path):
    model, _ = trained_model(tiny_model_dir("llama"), steps=1)
    with pytest.warns(DeprecationWarning, match="export_merged"):
        out = export_adapter(model, tmp_path / "merged", merged=True)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


def test_export_replaces_a_folder_atomically(tiny_model_dir, tmp_path):
    model, _ = trained_model(tiny_model_dir("llama"), steps=1)
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    export_adapter(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind
