"""What a newcomer meets on a first run: bad input named before any work (damaged weights, empty responses, an
output folder that is a file, a missing model, a typo in a flag), the dry run's parameter count, one final
evaluation, and a rerun that says what it replaces. Each error: exit code 2, one line, no traceback."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import transformers
from conftest import fails_with, run_cli, tiny_tokenizer, write_dataset
from transformers import LlamaConfig

from qloraga import load_model
from qloraga.cli.finetune import main as finetune
from qloraga.cli.finetune import parser
from qloraga.config import RunConfig
from qloraga.errors import DataError, ModelSourceError
from qloraga.formats import count_empty_responses
from qloraga.recipe import prepare_output_dir
from qloraga.runs import RUN_OUTPUTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "train.jsonl", "prompt-completion")


def test_damaged_safetensors_is_named(tiny_model_dir, tmp_path, data, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    fails_with(capsys, run_cli(str(model), data, tmp_path / "out"), f"{weights} is damaged or incomplete",
               "download or copy it again")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelSourceError, match="damaged or incomplete"):
        load_model(model)
    weights.write_bytes(b"\x10\x00")  # shorter than the header's length field
    with pytest.raises(ModelSourceError, match="damaged or incomplete"):
        load_model(model)
    weights.unlink()  # an index naming a shard that is not there
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    fails_with(capsys, run_cli(str(model), data, tmp_path / "out", "--dry-run"),
               "names model-00002-of-00002.safetensors, which is not there")


@pytest.mark.parametrize(("fmt", "empty", "field"), [
    ("prompt-completion", {"prompt": "1 plus 2 is", "completion": ""}, "'completion'"),
    ("alpaca", {"instruction": "Add.", "input": "1 and 2", "output": "  "}, "'output'"),
    ("messages", {"messages": [{"role": "user", "content": "1 plus 2?"}, {"role": "assistant", "content": ""}]},
     "assistant messages' 'content'"),
])
def test_empty_responses(tiny_model_dir, tmp_path, capsys, fmt, empty, field):
    path = tmp_path / "d.jsonl"
    path.write_text(2 * (json.dumps(empty) + "\n"))
    fails_with(capsys, run_cli(tiny_model_dir("llama"), str(path), tmp_path / "out"),
               f"--dataset {path}", f"every one of the 2 records has an empty {field}")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="every one of the 2 records"):
        count_empty_responses([empty, empty], fmt)


def test_some_empty_responses_are_counted(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"{i} plus 1 is", "completion": "" if i % 8 == 0 else f" {i + 1}"} for i in range(24)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(tiny_model_dir("llama"), str(path), tmp_path / "out", "--dry-run") == 0
    assert (f"note: --dataset {path}: 3 of 24 records have an empty 'completion'; they teach only the end-of-text "
            "token") in capsys.readouterr().out


def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, data, capsys):
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        fails_with(capsys, run_cli(tiny_model_dir("llama"), data, out),
                   f"--output-dir / output_dir {out}: {tmp_path / 'taken'} is a file, not a folder")


def test_missing_model_is_named_before_anything_else(tmp_path, data, capsys):
    out, _ = fails_with(capsys, run_cli(str(tmp_path / "nope"), data, tmp_path / "out"),
                        f"--model / model {str(tmp_path / 'nope')!r} does not exist")
    assert "preset" not in out  # no note about presets for a model that is not there


def test_flag_typos_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["--init-memory-gb", "auot"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--init-memory-gb: expected a number of GiB or 'auto', got 'auot'" in err and "gib_or_auto" not in err
    model_help = next(a.help for a in parser()._actions if "--model" in a.option_strings)
    assert ".gguf file" in model_help


def test_dry_run_counts_a_tied_embedding_once(tmp_path, capsys):
    """SmolLM2-135M's shape (tied embeddings): 134.5M parameters, not 162.8M."""
    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    LlamaConfig(**shape).save_pretrained(tmp_path / "smollm2")
    tiny_tokenizer().save_pretrained(tmp_path / "smollm2")
    h, kv = 576, 576 // 9 * 3
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * 1536 + 2 * h  # q, o; k, v; gate, up, down; two norms
    expected = 49152 * h + 30 * per_layer + h
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    assert finetune(["--model", str(tmp_path / "smollm2"), "--dataset", data, "--4bit", "--dry-run"]) == 0
    assert f"memory estimate for {expected / 1e6:.1f}M parameters" in capsys.readouterr().out
    assert f"{expected / 1e6:.1f}" == "134.5"


def test_held_out_set_is_scored_once_at_the_end(tiny_model_dir, tmp_path, data, monkeypatch):
    calls = []
    evaluate = transformers.Trainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", counted)
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir("llama"), data, out, "--eval-steps", "2", "--eval-split", "0.2",
                   "--report-to", "none") == 0
    assert calls == [2]  # the Trainer's at step 2; not at step 4, where the recipe scores everything
    evals = [r for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in (r := json.loads(line))]
    after = json.loads((out / "results.json").read_text())["after"]["eval_loss"]
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["eval_loss"] == after


def test_overwrite_says_what_it_deletes(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "gguf").mkdir(parents=True)
    (out / "config.yaml").write_text("model: demo\n")
    prepare_output_dir(out, RunConfig(overwrite=True))
    said = capsys.readouterr().out
    assert f"--overwrite: deleting {out} (the previous run and everything in it: config.yaml, gguf)" in said
    assert list(out.iterdir()) == []


def demo_real():
    spec = importlib.util.spec_from_file_location("demo_real", ROOT / "scripts" / "demo_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_real_keeps_exports(tmp_path, capsys):
    module = demo_real()
    out = tmp_path / "demo-real"
    for name in RUN_OUTPUTS:
        (out / name).mkdir(parents=True)
    assert module.not_a_run(out) == []  # a previous demo run alone: replaced (and the run says so)
    (out / "gguf").mkdir()
    (out / "notes.txt").write_text("mine")
    assert module.main(["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds gguf/, notes.txt besides a previous run" in err and "ARGS=--overwrite" in err
    assert (out / "gguf").exists()
