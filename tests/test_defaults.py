"""Defaults a user without a preset can trust: each init's own learning rate, one field that picks the method,
and a saved config.yaml that runs the same settings again."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import COMMON, run_cli, tiny_tokenizer, write_dataset
from transformers import AutoConfig, AutoModelForCausalLM

from qloraga.cli.finetune import main, resolve, resolve_settings
from qloraga.config import ConfigError, RunConfig
from qloraga.presets import detect_preset, suggest_preset


@pytest.fixture(scope="module")
def no_preset_model(tmp_path_factory):
    """A tiny OLMo 2 (a family without a preset), random weights, with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("olmo2")
    config = AutoConfig.for_model("olmo2", **{k: v for k, v in COMMON.items() if k != "num_key_value_heads"})
    assert detect_preset(config.model_type) is None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def loss_drop(model, data, out, *extra) -> float:
    argv = ["--model", model, "--dataset", data, "--output-dir", str(out), "--init", "lora-one", "--rank", "4",
            "--max-steps", "8", "--batch-size", "4", "--grad-accum", "1", "--ga-batches", "2", "--seq-len", "64",
            "--eval-samples", "0", "--eval-steps", "0", "--no-gradient-checkpointing", "--dtype", "float32",
            "--seed", "3", *extra]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    return results["before"]["eval_loss"] - results["after"]["eval_loss"]


def test_a_run_without_lr_on_a_family_without_preset_trains_at_the_inits_rate(no_preset_model, tmp_path):
    """No --lr on a family without a preset: LoRA-One's own rate, which lowers the held-out loss at least as much
    as the rate the matching preset (the one the note suggests) gives LoRA-One, and more than the full-fine-tuning
    rate the run used to get (2e-5)."""
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion", n=64)
    preset_lr = resolve({"preset": suggest_preset("olmo2"), "init": "lora-one"}).lr
    default = loss_drop(no_preset_model, data, tmp_path / "default")
    config = (tmp_path / "default" / "config.yaml").read_text()
    assert "# lr 0.0002 for init lora-one: the built-in default" in config and "no preset" in config
    with_preset_rate = loss_drop(no_preset_model, data, tmp_path / "preset", "--lr", str(preset_lr))
    old_default = loss_drop(no_preset_model, data, tmp_path / "old", "--lr", "2e-5")
    assert default > 0 and default >= with_preset_rate - 1e-6
    assert default > old_default


def test_config_yaml_runs_the_same_settings_again(tiny_model_dir, tmp_path):
    """`qloraga finetune --config OUT/config.yaml` resolves to the run's settings field for field (its method
    included), and a second run from it writes the same config.yaml."""
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion")
    out = tmp_path / "first"
    assert run_cli(tiny_model_dir("llama"), data, out, "--init", "lora-one") == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["init"] == "lora-one" and saved["lora_ga"]["method"] == "lora-one"
    assert resolve({"config": str(out / "config.yaml")}).to_dict() == saved
    again = tmp_path / "again"
    assert main(["--config", str(out / "config.yaml"), "--output-dir", str(again)]) == 0
    resaved = yaml.safe_load((again / "config.yaml").read_text())
    assert resaved == {**saved, "output_dir": str(again)}


def test_one_field_picks_the_method(tmp_path):
    """A YAML `lora_ga.method` (the library's name) sets the run's init instead of being ignored; giving both
    differently is refused; the resolved config always says the method that runs."""
    method_only = tmp_path / "method.yaml"
    method_only.write_text("lora_ga:\n  method: lora-ga\n")
    cfg = resolve({"config": str(method_only)})
    assert cfg.init == "lora-ga" and cfg.lora_ga.method == "lora-ga"
    both = tmp_path / "both.yaml"
    both.write_text("init: lora-one\nlora_ga:\n  method: lora-ga\n")
    with pytest.raises(ConfigError, match="disagree"):
        resolve({"config": str(both)})
    plain = tmp_path / "plain.yaml"  # a plain-LoRA run's config.yaml: its unused lora_ga.method is no conflict
    plain.write_text("init: lora\nlora_ga:\n  method: lora-ga\n")
    assert resolve({"config": str(plain)}).init == "lora"
    assert RunConfig(init="lora-one").lora_ga.method == "lora-one"
    assert resolve_settings({"init": "lora-ga"}).config.lora_ga.method == "lora-ga"
