"""`qloraga chat` on a real demo run (4-bit, fp32, 3 steps), and checkpoints rebuilt with their correction."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import training_prompt
from safetensors.torch import load_file, save_file

from qloraga.cli.chat import main as chat_main
from qloraga.runs import checkpoint_adapter, load_run_model, open_run

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tom has 3 apples and buys 4 more. How many apples does Tom have?"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "run"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--4bit", "--max-steps", "3",
                    "--save-steps", "2", "--dtype", "float32", "--output-dir", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def answer(capsys, *args: str) -> str:
    capsys.readouterr()
    assert chat_main(["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8", *args]) == 0
    return capsys.readouterr().out


def test_chat_prompt_answers(demo_run, capsys):
    tuned = answer(capsys, "--run", str(demo_run))
    assert tuned.strip()
    print(f"fine-tuned: {tuned!r}")
    # The last checkpoint is the final adapter: the same greedy answer.
    assert answer(capsys, "--run", str(demo_run), "--checkpoint", "3") == tuned
    base = answer(capsys, "--run", str(demo_run), "--base-only")
    print(f"base: {base!r}")
    assert base != tuned


def test_chat_script_streams(demo_run):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chat.py"), "--run", str(demo_run), "--prompt",
                             PROMPT, "--temperature", "0", "--max-new-tokens", "4"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip()


def test_conversation_is_kept(demo_run, capsys):
    from qloraga.cli.chat import Chat, parser

    model, tokenizer = load_run_model(open_run(demo_run))
    chat = Chat(model, tokenizer, parser().parse_args(["--run", str(demo_run), "--temperature", "0",
                                                       "--max-new-tokens", "4"]))
    first = chat.reply("3 plus 4?")
    chat.reply("and 5 plus 6?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first
    chat.reset()
    assert chat.messages == []


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_checkpoint_is_the_corrected_adapter(demo_run, tmp_path):
    run = open_run(demo_run)
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    final, _ = load_run_model(run)
    from_checkpoint, _ = load_run_model(run, checkpoint=3)
    assert torch.allclose(logits(final, ids), logits(from_checkpoint, ids), atol=1e-5)
    # The rank-r checkpoint alone (plain PEFT, no correction) is a different model.
    plain, _ = load_run_model(run, base_only=True)
    from peft import PeftModel

    plain = PeftModel.from_pretrained(plain, run.checkpoint_dir(3))
    assert not torch.allclose(logits(final, ids), logits(plain, ids), atol=1e-3)
    # A checkpoint without the correction buffers takes them from the run's lora_ga_cache/.
    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy)
    ckpt = copy / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(ckpt)).items() if "qloraga_" not in k}, str(ckpt))
    a = load_file(str(checkpoint_adapter(open_run(copy), 3, tmp_path / "a") / "adapter_model.safetensors"))
    b = load_file(str(checkpoint_adapter(run, 3, tmp_path / "b") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(copy / "lora_ga_cache")
    with pytest.raises(ValueError, match="no LoRA-GA correction"):
        checkpoint_adapter(open_run(copy), 3, tmp_path / "c")


def test_errors(demo_run, tmp_path, capsys):
    assert chat_main(["--run", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert chat_main(["--run", str(demo_run), "--checkpoint", "99", "--prompt", "x"]) == 2
    assert "2, 3" in capsys.readouterr().err


def test_demo_has_no_gguf_tokenizer(demo_run, capsys):
    from qloraga.cli.export import main as export_main

    assert export_main(["--run", str(demo_run), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "WordLevel" in err and "merged folder" in err
    assert not (demo_run / "gguf").exists()


def test_chat_renders_prompts_as_training_did(demo_run, capsys):
    """The demo trains on prompt-completion data (config.yaml records the detected format): chat's prompt is the
    message laid out as training laid out a prompt, no chat template, so its answer is the greedy completion of the
    training-format prompt."""
    run = open_run(demo_run)
    assert run.config.dataset_format == "prompt-completion"
    capsys.readouterr()
    assert chat_main(["--run", str(demo_run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "prompts rendered as in training: prompt-completion" in captured.err
    model, tokenizer = load_run_model(run)
    ids = torch.tensor([training_prompt(tokenizer, PROMPT)])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    assert captured.out.strip() == tokenizer.decode(greedy, skip_special_tokens=True).strip()
    assert chat_main(["--run", str(demo_run), "--prompt", PROMPT, "--system", "Be brief."]) == 2
    assert "--system: this run trained on prompt-completion data" in capsys.readouterr().err
