"""Every supported family with its preset's LoRA-GA settings on a tiny 4-bit model: the preset's targets exist,
exact at step 0, one training step moves it, and the exported adapter computes the trained model."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, FAMILY_PRESETS, FAMILY_TARGETS, logits, make_batches, rel, sgd_step
from peft import PeftModel
from transformers import AutoConfig

from qloraga import QLoraGAConfig, export_adapter, get_qloraga_model, load_model
from qloraga.adapters import corrected_layers
from qloraga.presets import detect_preset, load_preset


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_end_to_end(tiny_model_dir, tmp_path, family):
    path = tiny_model_dir(family)
    preset = detect_preset(AutoConfig.from_pretrained(path).model_type)  # the family's (size aside)
    assert preset == FAMILY_PRESETS.get(family, family)
    settings = {**load_preset(preset)["lora_ga"], "r": 4, "progress": False}  # the preset's targets, fp32 adapters
    batches = make_batches()
    base = logits(load_model(path), batches)
    model = get_qloraga_model(load_model(path), QLoraGAConfig.from_dict(settings), batches)
    leaves = {n.rsplit(".", 1)[-1] for n in corrected_layers(model)}
    assert leaves == FAMILY_TARGETS[family]
    assert len(corrected_layers(model)) == 2 * len(FAMILY_TARGETS[family])
    assert rel(logits(model, batches), base) < 1e-5  # step 0 is the quantized base
    sgd_step(model, batches, lr=1e-2)
    trained = logits(model, batches)
    assert rel(trained, base) > 1e-4  # one training step moves the model
    out = export_adapter(model, tmp_path / "adapter")
    # PEFT's default load keeps the fp32 adapters in fp32 (autocast_adapter_dtype=False would round them to the
    # base's bf16, and [B, -B0] no longer cancels: ~4% off after one step).
    loaded = PeftModel.from_pretrained(load_model(path), out)
    assert rel(logits(loaded, batches), trained) < 1e-5
