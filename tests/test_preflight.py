"""Bad options fail before any weight is loaded, any data tokenized or any output written, naming the flag or
YAML key the user wrote; the third-party noise qloraga filters stays filtered."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing

import pytest
from conftest import run_cli, write_dataset

import qloraga.recipe as recipe
from qloraga.cli.finetune import parser, resolve
from qloraga.config import ConfigError, QLoraGAConfig, RunConfig, option
from qloraga.model_source import causal_lm_config
from qloraga.preflight import check_run, check_targets


@pytest.fixture
def no_work(monkeypatch):
    """Loading weights or tokenizing fails the test: the errors below must come before either."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded or data tokenized before the options were checked")

    monkeypatch.setattr(recipe, "load_base", forbidden)
    monkeypatch.setattr(recipe, "tokenize", forbidden)
    monkeypatch.setattr(recipe.AutoTokenizer, "from_pretrained", forbidden)


def fails_early(capsys, out, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # no half-made run to --overwrite afterwards
    return err


@pytest.mark.parametrize(("rank", "init", "limit"), [(100000, "lora-ga", "r <= 16"), (33, "lora-ga", "r <= 16"),
                                                     (65, "lora", "r <= 32")])
def test_rank_too_large_for_the_smallest_target(tiny_model_dir, tmp_path, capsys, no_work, rank, init, limit):
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--rank", str(rank), "--init", init)
    fails_early(capsys, tmp_path / "out", code, "--rank / lora_ga.r", limit)


def test_rank_fits_plain_lora_but_not_lora_ga(tiny_model_dir):
    model = tiny_model_dir("llama")  # hidden 64: LoRA-GA takes 2r directions, plain LoRA r
    config = causal_lm_config(model)
    cfg = resolve({"model": model, "rank": 24, "init": "lora-ga"})
    with pytest.raises(ConfigError, match=r"--rank / lora_ga\.r 24"):
        check_targets(cfg, config)
    check_targets(dataclasses.replace(cfg, init="lora"), config)
    check_targets(dataclasses.replace(cfg, init="lora-one"), config)  # r directions, as plain LoRA


def test_rank_zero_names_the_flag(tiny_model_dir, tmp_path, capsys, no_work):
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--rank", "0")
    fails_early(capsys, tmp_path / "out", code, "--rank / lora_ga.r", "positive integer")


def test_unknown_target_modules_name_the_yaml_key(tiny_model_dir, tmp_path, capsys, no_work):
    (tmp_path / "c.yaml").write_text("lora_ga:\n  target_modules: [q_prj]\n")
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    code = run_cli(tiny_model_dir("phi3"), data, tmp_path / "out", "--config", str(tmp_path / "c.yaml"))
    fails_early(capsys, tmp_path / "out", code, "lora_ga.target_modules", "'q_prj'", "qkv_proj")


@pytest.mark.parametrize(("rows", "extra", "needles"), [
    ([{"prompt": "1", "completion": " 2"}, {"prompt": "1 plus 1"}], (),
     ("--dataset", "Record 2 lacks ['completion']", "detected from the first record")),
    ([{"question": "1?", "answer": "2"}], (), ("--dataset", "--dataset-format", "['answer', 'question']")),
    ([{"prompt": "1", "completion": " 2"}], ("--dataset-format", "alpaca"), ("Record 1 lacks ['instruction', "
                                                                            "'output']",)),
])
def test_dataset_fields_are_checked_before_tokenizing(tiny_model_dir, tmp_path, capsys, no_work, rows, extra,
                                                      needles):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    code = run_cli(tiny_model_dir("llama"), str(path), tmp_path / "out", *extra)
    fails_early(capsys, tmp_path / "out", code, str(path), *needles)


def test_eval_dataset_is_checked_too(tiny_model_dir, tmp_path, capsys, no_work):
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "1"}) + "\n")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--eval-dataset", str(tmp_path / "e.jsonl"))
    fails_early(capsys, tmp_path / "out", code, "--eval-dataset", "Cannot tell the dataset format")


@pytest.mark.parametrize(("settings", "needle"), [
    ({"seq_len": 0}, "--seq-len / seq_len must be at least 1"),
    ({"lr": 0.0}, "--lr / lr must be positive"),
    ({"init": "loraga"}, "--init / init must be one of 'lora-ga', 'lora-one', 'gora', 'lora', got 'loraga'"),
    ({"warmup_ratio": "lots"}, "warmup_ratio must be float"),
    ({"lora_ga": {"lora_alpha": -1}}, "--alpha / lora_ga.lora_alpha must be positive"),
    ({"lora_ga": {"scale": "loud"}}, "lora_ga.scale must be one of 'stable', 'gd', 'unit', 'weight_svd', got 'loud'"),
    ({"lora_ga": {"r": "8"}}, "--rank / lora_ga.r must be int"),
])
def test_messages_name_flag_and_yaml_key(settings, needle):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(settings)
    assert needle in str(info.value)


# Every flag users wrote before the parser was generated from the settings (qloraga 0.1.0's `finetune --help`).
LEGACY_FLAGS = ["--config", "--model", "--preset", "--dataset", "--dataset-split", "--eval-dataset",
                "--eval-dataset-split", "--dataset-format", "--output-dir", "--4bit", "--dtype", "--quant-storage",
                "--rank", "--alpha", "--direction", "--init", "--estimator", "--power-iters", "--oversample",
                "--ga-batches", "--init-memory-gb", "--max-steps", "--epochs", "--lr", "--batch-size", "--grad-accum",
                "--seq-len", "--packing", "--gradient-checkpointing", "--no-gradient-checkpointing", "--optim",
                "--save-steps", "--logging-steps", "--resume", "--overwrite", "--seed", "--eval-split",
                "--eval-steps", "--eval-samples", "--report-to", "--merge", "--trust-remote-code", "--dry-run"]


def test_every_legacy_flag_still_parses():
    known = {s for a in parser()._actions for s in a.option_strings}
    assert set(LEGACY_FLAGS) <= known, sorted(set(LEGACY_FLAGS) - known)


def other_value(hint, default):
    """A valid value of a setting's type that differs from its default."""
    union = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    options = [o for o in union if o is not type(None)]
    kind = options[0]
    if typing.get_origin(kind) is typing.Literal:
        return next(c for c in typing.get_args(kind) if c != default)
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return 0.25 if default != 0.25 else 0.5
    return "somewhere"


@pytest.mark.parametrize("cls", [RunConfig, QLoraGAConfig])
def test_each_flag_sets_its_setting_and_option_names_it(cls):
    """Each setting with a flag: the flag parses to that setting (resolved into the RunConfig), and `option()`
    names that same flag; a YAML-only setting has no flag and `option()` names its key alone."""
    section = "" if cls is RunConfig else "lora_ga."
    hints = typing.get_type_hints(cls)
    p = parser()
    flags = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(cls):
        if f.name == "lora_ga":
            continue
        flag = f.metadata["flag"]
        if flag is None:
            assert option(section + f.name) == section + f.name and section + f.name not in flags, f.name
            continue
        action = flags[section + f.name]
        name = action.option_strings[0]
        assert option(section + f.name) == f"{name} / {section}{f.name}"
        value = other_value(hints[f.name], f.default)
        if f.name in ("model", "dataset", "preset", "resume", "output_dir", "eval_dataset"):
            continue  # they need a real model, data or run folder to resolve (tested in test_cli / test_presets)
        argv = [name] if value is True else [f"--no-{name[2:]}"] if value is False else [name, str(value)]
        cfg = resolve(vars(p.parse_args(argv)))
        got = getattr(cfg if cls is RunConfig else cfg.lora_ga, f.name)
        assert got == value, (f.name, got, value)


def test_third_party_noise_is_filtered():
    """bitsandbytes' import-time kernel note and PEFT's use of a deprecated transformers name stay quiet."""
    code = ("import qloraga, torch; from peft import LoraConfig, get_peft_model; "
            "from transformers import LlamaConfig, LlamaForCausalLM; "
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
            "num_hidden_layers=1, num_attention_heads=2)); get_peft_model(m, LoraConfig(r=2))")
    result = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-c", code], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "is_gradient_checkpointing" not in result.stderr


def test_hub_dataset_config_and_splits(tiny_model_dir, monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"prompt": f"{split} {i}", "completion": " 1"} for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    model = tiny_model_dir("llama")
    checked = check_run(resolve({"model": model, "dataset": "org/sums:easy", "dataset_split": "train[:80%]",
                                 "eval_dataset_split": "validation"}))
    assert calls == [("org/sums", "easy", "train[:80%]"), ("org/sums", "easy", "validation")]
    assert checked.eval_records[0]["prompt"] == "validation 0" and len(checked.train_records) == 3
    calls.clear()
    check_run(resolve({"model": model, "dataset": "org/sums", "eval_dataset": "org/other:x",
                       "eval_dataset_split": "test"}))
    assert calls == [("org/sums", None, "train"), ("org/other", "x", "test")]


@pytest.mark.parametrize(("flags", "needle"), [
    (("--dataset-split", "test"), "--dataset-split / dataset_split 'test'"),
    (("--eval-dataset-split", "validation"), "--eval-dataset-split / eval_dataset_split 'validation'"),
])
def test_splits_of_a_local_file_are_refused(tiny_model_dir, tmp_path, capsys, no_work, flags, needle):
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", *flags)
    fails_early(capsys, tmp_path / "out", code, needle, "local file")
