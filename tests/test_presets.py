"""Family presets as data: every preset resolves, model types map to them, an unknown family gets safe defaults."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from qloraga.cli import resolve
from qloraga.config import RunConfig, merge_settings
from qloraga.presets import SAFE_DEFAULTS, available_presets, detect_preset, load_preset, suggest_preset

FAMILY_PRESETS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "smollm"}


def test_every_family_has_a_preset_that_resolves():
    assert FAMILY_PRESETS | {"demo"} <= set(available_presets())
    for name in available_presets():
        cfg = RunConfig.from_dict(merge_settings(RunConfig().to_dict(), load_preset(name)))
        # What a full-fine-tuning learning rate needs (fp32 adapters); the model presets use the randomized SVD.
        assert cfg.lora_ga.adapter_dtype == "float32", name
        if name != "demo":
            assert cfg.lora_ga.svd_niter == 4 and cfg.lora_ga.target_modules, name


@pytest.mark.parametrize(("model_type", "preset"), [
    ("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma", "gemma"),
    ("gemma2", "gemma"), ("gemma3_text", "gemma3"), ("phi3", "phi3"), ("smollm3", "smollm"), ("olmo2", None)])
def test_model_types_select_their_preset(model_type, preset):
    assert detect_preset(model_type) == preset


def test_smollm_is_sized_for_small_models():
    smollm, llama = load_preset("smollm"), load_preset("llama")
    assert smollm["lora_ga"] == llama["lora_ga"]  # the same projections (SmolLM2 is a Llama)
    assert smollm["seq_len"] > llama["seq_len"] and smollm["batch_size"] > llama["batch_size"]


def test_unknown_family_gets_safe_defaults_and_one_line(tmp_path, capsys):
    AutoConfig.for_model("olmo2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4).save_pretrained(tmp_path)
    cfg = resolve({"model": str(tmp_path)})
    assert cfg.preset is None
    for key, value in SAFE_DEFAULTS["lora_ga"].items():
        assert getattr(cfg.lora_ga, key) == value
    assert cfg.lora_ga.target_modules is None  # every linear layer of the decoder blocks
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "model_type 'olmo2'" in lines[0] and "--preset llama" in lines[0] and "svd_niter: 4" in lines[0]
    # A flag or a --config file still overrides the safe defaults.
    assert resolve({"model": str(tmp_path), "rank": 2}).lora_ga.r == 2


def test_suggestion_follows_the_model_type_name():
    assert suggest_preset("qwen2_moe") == "qwen2"
    assert suggest_preset("gemma3") == "gemma3"  # multimodal Gemma 3: try the text preset
    assert suggest_preset("falcon") == "llama"
    assert suggest_preset(None) == "llama"
