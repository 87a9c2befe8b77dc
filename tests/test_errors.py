"""One error base and one wrapper: every `qloraga` subcommand answers a bad input with exit code 2 and a
one-line `error:` message (the traceback only with QLORAGA_DEBUG=1), and `QLoraGAError` catches what the
public API raises on bad input."""

from __future__ import annotations

import json
import re

import pytest
from conftest import make_batches

import qloraga
from qloraga.cli import main
from qloraga.errors import ConfigError, DataError, ModelSourceError, QLoraGAError, RunError, RunInterrupted


def bad_input(name: str, tmp_path, model_dir: str) -> tuple[list[str], type[QLoraGAError], str]:
    """A subcommand's argv with one bad input, the error it must raise and the words its message must hold."""
    empty = tmp_path / "not-a-run"
    empty.mkdir(exist_ok=True)
    missing = str(tmp_path / "missing.jsonl")
    return {
        "finetune": (["finetune", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out")],
                     ConfigError, "does not exist"),
        "evaluate": (["evaluate", "--model", model_dir, "--dataset", missing], DataError, "missing.jsonl"),
        "export": (["export", "--run", str(empty)], RunError, "config.yaml"),
        "chat": (["chat", "--run", str(empty), "--prompt", "hi"], RunError, "config.yaml"),
    }[name]


@pytest.mark.parametrize("name", ["finetune", "evaluate", "export", "chat"])
def test_every_subcommand_answers_a_bad_input_in_one_line(name, tmp_path, tiny_model_dir, capsys, monkeypatch):
    argv, error, needle = bad_input(name, tmp_path, tiny_model_dir("llama"))
    monkeypatch.delenv("QLORAGA_DEBUG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()

    monkeypatch.setenv("QLORAGA_DEBUG", "1")  # the traceback: the error propagates out of the command
    with pytest.raises(error, match=re.escape(needle)):
        main(argv)


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    """Only qloraga's errors (and files the user named) become one line: anything else keeps its traceback."""
    from qloraga.cli import run_command

    monkeypatch.delenv("QLORAGA_DEBUG", raising=False)

    def buggy() -> None:
        raise ValueError("an internal invariant broke")

    with pytest.raises(ValueError, match="invariant"):
        run_command(buggy)


@pytest.fixture
def plain_model(tiny_model_dir):
    return qloraga.load_model(tiny_model_dir("llama"))


@pytest.mark.parametrize(("call", "error", "needle"), [
    (lambda m, tmp: qloraga.QLoraGAConfig(r=0), ConfigError, "positive"),
    (lambda m, tmp: qloraga.get_qloraga_model(m, qloraga.QLoraGAConfig(r=4, progress=False), []), DataError,
     "empty"),
    (lambda m, tmp: qloraga.get_qloraga_model(m, qloraga.QLoraGAConfig(r=4, target_modules=["nope"], progress=False),
                                              make_batches()), ConfigError, "q_proj"),
    (lambda m, tmp: qloraga.get_qloraga_model(m, qloraga.QLoraGAConfig(r=17, progress=False), make_batches()),
     ConfigError, "r <= 16"),
    (lambda m, tmp: qloraga.export_adapter(m, tmp / "out"), ModelSourceError, "no adapters"),
    (lambda m, tmp: qloraga.export_merged(m, tmp / "out"), ModelSourceError, "no adapters"),
    (lambda m, tmp: qloraga.load_model(tmp / "nowhere"), ConfigError, "does not exist"),
    (lambda m, tmp: qloraga.load_model(tmp), ModelSourceError, "config.json"),
], ids=["config-r0", "empty-batches", "no-target", "rank-too-large", "export-adapter-plain", "export-merged-plain",
        "missing-model", "not-a-model-folder"])
def test_the_public_api_raises_qloraga_errors_on_bad_input(plain_model, tmp_path, call, error, needle):
    with pytest.raises(QLoraGAError, match=re.escape(needle)) as caught:
        call(plain_model, tmp_path)
    assert isinstance(caught.value, error)
    assert not (tmp_path / "out").exists()  # an export refused writes nothing


def test_run_folders_and_data_files_raise_qloraga_errors(tmp_path):
    from qloraga.data import read_records
    from qloraga.runs import open_run

    with pytest.raises(RunError, match=r"config\.yaml"):
        open_run(tmp_path)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2"):
        read_records(str(tmp_path / "bad.jsonl"))


def test_a_second_ctrl_c_raises_our_interrupt_not_a_bare_keyboard_interrupt():
    from qloraga.training import GracefulInterrupt

    guard = GracefulInterrupt()
    guard.handle(None, None)  # the first asks for a checkpoint after this step
    assert guard.requested
    with pytest.raises(RunInterrupted, match="second Ctrl-C"):
        guard.handle(None, None)
