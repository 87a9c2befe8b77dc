"""Family presets as data: every preset resolves, model types map to them, an unknown family gets safe defaults."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from qloraga.cli.finetune import resolve, resolve_settings
from qloraga.config import DEFAULT_LR, INITS, RunConfig, merge_settings
from qloraga.presets import (
    SAFE_DEFAULTS,
    available_presets,
    choose_preset,
    detect_preset,
    load_preset,
    parameter_count,
    suggest_preset,
)

FAMILY_PRESETS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "smollm"}


def test_every_family_has_a_preset_that_resolves():
    assert FAMILY_PRESETS | {"demo"} <= set(available_presets())
    for name in available_presets():
        cfg = RunConfig.from_dict(merge_settings(RunConfig().to_dict(), load_preset(name)))
        # What a full-fine-tuning learning rate needs (fp32 adapters, the default); the model presets use the
        # randomized SVD.
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


def test_unknown_family_gets_safe_defaults_and_one_line(tmp_path):
    AutoConfig.for_model("olmo2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4).save_pretrained(tmp_path)
    resolved = resolve_settings({"model": str(tmp_path)})
    cfg = resolved.config
    assert cfg.preset is None
    for key, value in SAFE_DEFAULTS["lora_ga"].items():
        assert getattr(cfg.lora_ga, key) == value
    assert cfg.lora_ga.target_modules is None  # every linear layer of the decoder blocks
    line = resolved.lines()[0]
    assert "model_type 'olmo2'" in line and "--preset llama" in line and "svd_niter: 4" in line
    # A flag or a --config file still overrides the safe defaults.
    assert resolve({"model": str(tmp_path), "rank": 2}).lora_ga.r == 2


def test_suggestion_follows_the_model_type_name():
    assert suggest_preset("qwen2_moe") == "qwen2"
    assert suggest_preset("gemma3") == "gemma3"  # multimodal Gemma 3: try the text preset
    assert suggest_preset("falcon") == "llama"
    assert suggest_preset(None) == "llama"


def olmo2(path):
    AutoConfig.for_model("olmo2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4).save_pretrained(path)
    return str(path)


def test_each_init_gets_its_own_rate_without_a_preset(tmp_path):
    """A family without a preset: each init's own default rate, said with where it came from; --lr wins."""
    model = olmo2(tmp_path)
    rates = {}
    for init in INITS:
        resolved = resolve_settings({"model": model, "init": init})
        rates[init] = resolved.config.lr
        assert f"lr {rates[init]:g} for init {init}: the built-in default" in resolved.lines()[1]
    assert rates == {"lora-one": 2e-4, "lora": 2e-4, "lora-ga": 2e-5, "gora": 2e-4} == DEFAULT_LR
    forced = resolve_settings({"model": model, "lr": 1e-3})
    assert forced.config.lr == 1e-3 and forced.lines()[1].endswith(": --lr")


def test_a_preset_gives_a_rate_per_init(tmp_path):
    smollm = load_preset("smollm")["lr"]
    for init in INITS:
        resolved = resolve_settings({"preset": "smollm", "init": init})
        assert resolved.config.lr == smollm[init]
        assert resolved.lines()[1].endswith(f"preset smollm, its rate for {init}")
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5.0e-4\n")
    assert resolve_settings({"preset": "smollm", "config": str(config)}).lines()[1].endswith(f"--config {config}")


def test_preset_follows_family_and_size(tmp_path):
    """SmolLM2 is model_type llama: below 1B parameters it gets the small-model preset, a 7B shape the llama one;
    the count comes from config.json (tied embeddings once), checked against the shapes by hand."""
    small = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                 tie_word_embeddings=True)
    h, i, kv = 576, 1536, 3 * 64
    by_hand = 49152 * h + 30 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert parameter_count(small) == by_hand  # SmolLM2-135M: 134,515,008
    big = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32)
    assert parameter_count(big) > 6e9
    for config, name, expected in [(small, "small", "smollm"), (big, "big", "llama")]:
        config.save_pretrained(tmp_path / name)
        preset, why = choose_preset(str(tmp_path / name))
        assert preset == expected and "model_type 'llama'" in why, why
    assert "below 1B" in choose_preset(str(tmp_path / "small"))[1]
    assert resolve({"model": str(tmp_path / "small")}).lr == load_preset("smollm")["lr"]["lora-one"]
    assert resolve({"model": str(tmp_path / "small"), "preset": "llama"}).preset == "llama"  # --preset wins
