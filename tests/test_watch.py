"""Training you can watch: held-out loss during training, loggers, exact match only where it means something,
and a README that documents every flag."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_tokenizer, write_dataset

from qloraga.cli.finetune import main
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


def test_eval_steps_zero_turns_evaluation_during_training_off(tiny_model_dir, tmp_path):
    from qloraga import QLoraGAConfig
    from qloraga.adapters import get_lora_model
    from qloraga.batches import Collator, Example
    from qloraga.config import RunConfig
    from qloraga.loading import load_model
    from qloraga.training import build_trainer

    model = get_lora_model(load_model(tiny_model_dir("llama")), QLoraGAConfig(r=2))
    rows = [Example([1, 5, 6], [-100, 5, 6])] * 4
    for steps, strategy in [(0, "no"), (3, "steps")]:
        cfg = RunConfig(eval_steps=steps, report_to="none", max_steps=1)
        trainer = build_trainer(model, rows, Collator(0), cfg, tmp_path / str(steps), eval_examples=rows)
        assert trainer.args.eval_strategy == strategy and (trainer.eval_dataset is None) == (steps == 0)


def logged_tags(logger: str, tmp_path, out) -> set[str]:
    """The metric names the logger wrote to disk: TensorBoard's event files, wandb's offline run file."""
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = set()
        for events in (out / "checkpoints").rglob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            tags |= set(accumulator.Tags()["scalars"])
        return tags
    data = b"".join(f.read_bytes() for f in (tmp_path / "wandb").rglob("*.wandb"))
    return {tag for tag in ("train/loss", "eval/loss") if tag.encode() in data}


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_report_to_logs_training_and_held_out_loss(tiny_model_dir, tmp_path, monkeypatch, logger):
    pytest.importorskip(logger)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: wandb writes its run under WANDB_DIR
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion", n=24)
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir("llama"), data, out, "--report-to", logger, "--eval-steps", "2") == 0
    assert {"train/loss", "eval/loss"} <= logged_tags(logger, tmp_path, out)
    if logger == "wandb":
        import wandb

        assert wandb.run is None  # finished: a second run in this process starts its own


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


def test_options_doc_documents_every_finetune_flag():
    from pathlib import Path

    from qloraga.cli.finetune import parser

    readme = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    flags = {s for action in parser()._actions for s in action.option_strings if s.startswith("--")} - {"--help"}
    assert sorted(f for f in flags if f"`{f}" not in readme) == []
