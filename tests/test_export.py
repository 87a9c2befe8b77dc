"""Export round trips through upstream PEFT and transformers, after a few training steps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_TARGETS, logits, make_batches, rel
from peft import PeftModel
from safetensors.torch import load_file
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
    model, batches = trained_model(path, load_in_4bit, adapter_dtype="bfloat16")  # the base's dtype: see below
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


def test_a_sharded_merged_export_loads_as_the_unsharded_one(tiny_model_dir, tmp_path, monkeypatch):
    """Shards small enough that the embedding (16 KiB) is larger than one: each shard is written as it fills,
    the index maps every tensor to the file that holds it, and transformers loads the very same model."""
    import qloraga.export.merged as merged_module

    model, batches = trained_model(tiny_model_dir("llama"))
    whole = export_merged(model, tmp_path / "whole")
    monkeypatch.setattr(merged_module, "SHARD_BYTES", 12 * 2**10)
    sharded = export_merged(model, tmp_path / "sharded")

    tensors = load_file(whole / "model.safetensors")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 4 and "model.safetensors" not in files
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert not list(sharded.glob(".shard-*"))  # the temporary names are gone
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for name in files:
        shard = load_file(sharded / name)
        assert set(shard) == {k for k, f in index["weight_map"].items() if f == name}
        assert sum(t.nbytes for t in shard.values()) <= 12 * 2**10 or len(shard) == 1  # a big one alone
        for key, tensor in shard.items():
            assert torch.equal(tensor, tensors[key]), key

    a = AutoModelForCausalLM.from_pretrained(whole, dtype=torch.bfloat16)
    b = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(logits(a, batches), logits(b, batches))


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
