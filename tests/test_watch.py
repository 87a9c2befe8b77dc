"""Training you can watch: held-out loss during training, loggers, exact match only where it means something,
and a README that documents every flag."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_tokenizer
from test_cli import run_cli, write_dataset

from qloraga.cli import main
from qloraga.evaluation import SHORT_ANSWER_TOKENS, scored_pairs


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_held_out_loss_every_eval_steps_matches_the_final_evaluation(tiny_model_dir, tmp_path):
    """The Trainer's held-out loss at the last step is the loss our own evaluation computes after training (one
    held-out batch, so Trainer's batch mean is the token mean)."""
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion", n=40)
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir("llama"), data, out, "--eval-steps", "2", "--eval-split", "0.2",
                   "--report-to", "none") == 0
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    after = json.loads((out / "results.json").read_text())["after"]["eval_loss"]
    assert evals[-1]["eval_loss"] == pytest.approx(after, rel=1e-4)
    assert (out / "loss.png").exists()


def test_eval_steps_zero_evaluates_only_before_and_after(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion", n=40)
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir("llama"), data, out, "--eval-steps", "0", "--report-to", "none") == 0
    assert not [r for r in metrics(out) if "eval_loss" in r]


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_report_to_writes_the_logger_files(tiny_model_dir, tmp_path, monkeypatch, logger):
    pytest.importorskip(logger)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: wandb writes its run to ./wandb
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion", n=24)
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir("llama"), data, out, "--report-to", logger, "--eval-steps", "2") == 0
    if logger == "tensorboard":
        events = list((out / "checkpoints").rglob("events.out.tfevents.*"))
    else:
        events = list((tmp_path / "wandb").rglob("*.wandb"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_report_to_a_missing_logger_fails_before_loading(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["--report-to", "wandb", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--report-to" in err and "pip install wandb" in err
    assert not (tmp_path / "out").exists()


def test_exact_match_scores_short_prompt_completion_answers_only():
    tok = tiny_tokenizer()
    short = [{"prompt": f"{a} plus 2 is", "completion": f" {a + 2}"} for a in range(5)]
    alpaca = [{"instruction": "Add.", "input": f"{a} and 2", "output": f"{a + 2}"} for a in range(5)]
    long = [*short, {"prompt": "Tell a story:", "completion": " once upon a time" * SHORT_ANSWER_TOKENS}]
    chat = [{"messages": [{"role": "user", "content": "1 plus 2?"}, {"role": "assistant", "content": "3"}]}]
    text = [{"text": "1 plus 2 is 3."}]
    assert [answer for _, answer in scored_pairs(short, "auto", tok, 200)] == [str(a + 2) for a in range(5)]
    assert len(scored_pairs(alpaca, "auto", tok, 200)) == 5
    assert len(scored_pairs(short, "auto", tok, 3)) == 3
    for records in (long, chat, text):
        assert scored_pairs(records, "auto", tok, 200) == []
    assert scored_pairs(short, "auto", tok, 0) == []


def test_readme_documents_every_finetune_flag():
    from pathlib import Path

    from qloraga.cli import parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flags = {s for action in parser()._actions for s in action.option_strings if s.startswith("--")} - {"--help"}
    assert sorted(f for f in flags if f"`{f}" not in readme) == []
