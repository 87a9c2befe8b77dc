"""The training prompts' frame through the commands: a run on framed prompt-completion data, then `qloraga chat`
(the ids the model generates from are training's ids of the framed prompt, written out by hand), `qloraga export
--format gguf` (the Modelfile's template) and the web page's line; `--no-frame` sends the message as written."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from conftest import run_cli, save_family, training_prompt

from qloraga.cli.chat import main as chat_main
from qloraga.prompt_frame import Frame
from qloraga.runs import load_run_model, open_run

HEAD, TAIL = "Add these numbers:\n", "\nTheir sum:"
MESSAGE = "3 and 4"


@pytest.fixture(scope="module")
def framed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frame")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{HEAD}{a} and {b}{TAIL}", "completion": f" {a + b}"}) + "\n"
                            for a in range(6) for b in range(4)))
    assert run_cli(save_family("llama", root / "model"), str(data), root / "run", "--max-steps", "2") == 0
    # finetune records the frame (a run without the record gets it from its data file when first asked)
    assert json.loads((root / "run" / "prompt_frame.json").read_text()) == {"prefix": HEAD, "suffix": TAIL}
    return root / "run"


@pytest.fixture
def generated_from(monkeypatch):
    """The input ids of every `generate` call, as the model receives them."""
    calls = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"][0].tolist())
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    return calls


def said(err: str) -> str:
    """Chat's first line (the base's loading bars come before it)."""
    return next(line for line in err.splitlines() if "[qloraga]" in line)


def chat(capsys, run, *extra: str) -> str:
    capsys.readouterr()
    assert chat_main(["--run", str(run), "--prompt", MESSAGE, "--temperature", "0", "--max-new-tokens", "2",
                      *extra]) == 0
    return capsys.readouterr().err


def test_chat_sends_the_message_inside_the_training_frame(framed_run, capsys, generated_from):
    _, tokenizer = load_run_model(open_run(framed_run), base_only=True)
    err = chat(capsys, framed_run)
    assert generated_from == [training_prompt(tokenizer, HEAD + MESSAGE + TAIL)]
    first = said(err)
    assert "prompt-completion: the message inside the training prompts' frame, 'Add these numbers:\\n' + message " \
        "+ '\\nTheir sum:', no chat template (--no-frame: as written)" in first, err

    err = chat(capsys, framed_run, "--no-frame")
    assert generated_from[1] == training_prompt(tokenizer, MESSAGE)
    assert said(err).endswith("prompts rendered as in training: prompt-completion: the message is the prompt, as "
                              "written, no chat template")


def test_the_modelfile_holds_the_frame(framed_run, capsys):
    from qloraga.cli.export import main as export_main

    for extra, template in (([], f'TEMPLATE """{HEAD}{{{{ .Prompt }}}}{TAIL}"""'),
                            (["--no-frame"], 'TEMPLATE """{{ .Prompt }}"""')):
        assert export_main(["--run", str(framed_run), "--format", "gguf", "--output", str(framed_run / "g"),
                            *extra]) == 0, capsys.readouterr().err
        modelfile = (framed_run / "g" / "Modelfile").read_text()
        assert template in modelfile, modelfile
        first = modelfile.splitlines()[0]
        assert (first == "# Prompts are rendered as the run trained: prompt-completion: the message inside the "
                "training prompts' frame, 'Add these numbers:\\n' + message + '\\nTheir sum:', no chat template "
                "(qloraga export --no-frame: as written).") if not extra else first.startswith("FROM"), modelfile


def test_the_page_says_how_prompts_are_sent(framed_run):
    from qloraga.ui.jobs import RunsFolder
    from qloraga.ui.page import frame_line

    runs = RunsFolder(framed_run.parent)
    assert frame_line(runs, framed_run.name, True) == \
        "Prompts go inside the training prompts' frame: `'Add these numbers:\\n' + message + '\\nTheir sum:'`"
    assert frame_line(runs, framed_run.name, False).startswith("Prompts go as written")
    assert frame_line(runs, None, True) == ""


def test_a_run_without_the_record_gets_the_frame_from_its_data(framed_run, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(framed_run, older, ignore=shutil.ignore_patterns("checkpoints", "g", "prompt_frame.json"))
    assert open_run(older).prompt_frame() == Frame(HEAD, TAIL)
    assert json.loads((older / "prompt_frame.json").read_text()) == {"prefix": HEAD, "suffix": TAIL}
