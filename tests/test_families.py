"""Every supported family, with its default target modules: exact at step 0, exported adapter loads."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, FAMILY_TARGETS, make_batches, rel
from peft import PeftModel
from test_adapters import logits

from qloraga import QLoraGAConfig, export_adapter, get_qloraga_model, load_model
from qloraga.adapters import corrected_layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_end_to_end(tiny_model_dir, tmp_path, family):
    path = tiny_model_dir(family)
    batches = make_batches()
    base = logits(load_model(path), batches)
    model = get_qloraga_model(load_model(path), QLoraGAConfig(r=4, progress=False), batches)
    leaves = {n.rsplit(".", 1)[-1] for n in corrected_layers(model)}
    assert leaves == FAMILY_TARGETS[family]
    assert len(corrected_layers(model)) == 2 * len(FAMILY_TARGETS[family])
    assert rel(logits(model, batches), base) < 1e-5
    out = export_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(path), out, autocast_adapter_dtype=False)
    assert rel(logits(loaded, batches), base) < 1e-5
