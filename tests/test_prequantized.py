"""Pre-quantized checkpoints (the `*-bnb-4bit` repos: saved in 4-bit by transformers, with their
quantization_config) as a model source: detected from config.json and loaded as saved, byte for byte; the init's
gradient against their dequantized weights; a whole run on one (run line, adapter, upstream PEFT, merged and GGUF
exports, chat, resume); settings that contradict the checkpoint, 8-bit and other quantization methods refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from conftest import (
    estimated,
    fails_with,
    make_batches,
    rel,
    save_family,
    save_prequantized,
    training_prompt,
    write_dataset,
)
from reference import LOGIT_TOL, autograd_grads, compare, dequantized_fp32_copy, llama_cpp_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qloraga import load_model
from qloraga.cli.chat import main as chat_main
from qloraga.cli.export import main as export_main
from qloraga.cli.finetune import main as finetune
from qloraga.errors import ConfigError, ModelSourceError
from qloraga.loading import dequantized_weight, is_4bit
from qloraga.model_source import causal_lm_config
from qloraga.prequantized import prequantized
from qloraga.runs import load_run_model, open_run

IDS = torch.tensor([[1, 5, 9, 12, 7, 3, 40, 22]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_detected_and_loaded_as_saved(prequantized_model_dir, tiny_model_dir):
    path = prequantized_model_dir("qwen2")
    found = prequantized(causal_lm_config(path))
    assert (found.quant_type, found.double_quant, found.storage, found.compute_dtype) == ("nf4", True, "uint8",
                                                                                          "bfloat16")
    assert prequantized(causal_lm_config(tiny_model_dir("qwen2"))) is None
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    source = load_model(tiny_model_dir("qwen2"), load_in_4bit=True, dtype=torch.float32)  # our own NF4 of it
    for load_in_4bit in (False, True):  # with --4bit or without: the checkpoint's own 4-bit weights
        model = load_model(path, load_in_4bit=load_in_4bit, dtype=torch.float32)
        layers = {n: m for n, m in model.named_modules() if is_4bit(m)}
        assert len(layers) == 2 * 7
        ours = dict(source.named_modules())
        for name, layer in layers.items():
            assert torch.equal(layer.weight.data, stored[f"{name}.weight"])  # never re-quantized
            assert torch.equal(layer.weight.quant_state.absmax, stored[f"{name}.weight.absmax"])
            assert layer.compute_dtype == torch.float32  # --dtype, not the checkpoint's bfloat16
            # The weights it computes with are those --4bit makes of the unquantized source.
            assert torch.equal(dequantized_weight(layer), dequantized_weight(ours[name]))
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
        assert rel(logits(model), logits(dequantized_fp32_copy(model))) < 1e-5


def test_gradient_equals_autograd_on_dequantized_weights(prequantized_model_dir):
    model = load_model(prequantized_model_dir("qwen2"), dtype=torch.float32)
    batches = make_batches()
    grads, _ = estimated(model, batches, chunk_blocks=1)
    ref = autograd_grads(dequantized_fp32_copy(model), list(grads), batches)
    assert len(grads) == 2 * 7
    for name, g in grads.items():
        assert g.abs().sum() > 0
        assert rel(g, ref[name]) < 1e-4, name


def test_contradicting_storage_is_refused(prequantized_model_dir, tmp_path, capsys):
    path = prequantized_model_dir("qwen2")
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    fails_with(capsys, finetune(["--model", path, "--dataset", data, "--quant-storage", "bfloat16", "--dry-run"]),
               "--quant-storage / quant_storage bfloat16 contradicts the pre-quantized checkpoint", "stored as uint8")
    with pytest.raises(ConfigError, match="stored as uint8"):
        load_model(path, quant_storage=torch.bfloat16)
    load_model(path, quant_storage=torch.uint8)  # its own storage, given explicitly, is fine


def test_8bit_and_other_methods_are_refused(tiny_model_dir, tmp_path, capsys):
    source = tiny_model_dir("qwen2")
    eight = tmp_path / "qwen2-8bit"
    AutoModelForCausalLM.from_pretrained(source, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                         device_map="cpu").save_pretrained(eight)
    AutoTokenizer.from_pretrained(source).save_pretrained(eight)
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    for extra in ((), ("--4bit",)):
        argv = ["--model", str(eight), "--dataset", data, "--output-dir", str(tmp_path / "out"), *extra]
        fails_with(capsys, finetune(argv), "bitsandbytes 8-bit checkpoint", "unquantized original")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelSourceError, match="8-bit"):
        load_model(eight)
    config = json.loads((eight / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (eight / "config.json").write_text(json.dumps(config))
    fails_with(capsys, finetune(["--model", str(eight), "--dataset", data, "--dry-run"]), "saved quantized with 'gptq'")


def test_dry_run_says_prequantized(prequantized_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    assert finetune(["--model", prequantized_model_dir("qwen2"), "--dataset", data, "--dtype", "float32",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("pre-quantized 4-bit NF4 checkpoint, loaded as saved (not re-quantized), float32 compute (the "
            "checkpoint says bfloat16; --dtype sets it)") in out
    assert "weights (4-bit NF4 + float32 rest)" in out


# ------------------------------------------------------------------------------------------- a whole run
RUN_ARGS = ["--init", "lora-ga", "--rank", "4", "--batch-size", "4", "--grad-accum", "1", "--ga-batches", "2",
            "--seq-len", "64", "--lr", "1e-2", "--save-steps", "1", "--logging-steps", "1", "--eval-samples", "4",
            "--no-gradient-checkpointing", "--dtype", "float32", "--report-to", "none"]


def run_finetune(argv) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert finetune(argv) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def bnb_run(tmp_path_factory):
    """A 2-step run on a pre-quantized tiny Qwen2 with a byte-level tokenizer (GGUF export takes it)."""
    root = tmp_path_factory.mktemp("bnb-run")
    checkpoint = save_prequantized(save_family("qwen2", root / "source"), root / "qwen2-bnb-4bit")
    data = write_dataset(root / "train.jsonl", "prompt-completion")
    out = root / "run"
    argv = ["--model", checkpoint, "--dataset", data, *RUN_ARGS]
    stdout = run_finetune([*argv, "--output-dir", str(out), "--max-steps", "2"])
    return checkpoint, out, argv, stdout


def test_run_line_and_adapter(bnb_run):
    checkpoint, out, _, stdout = bnb_run
    assert f"model: {checkpoint} (pre-quantized 4-bit NF4 checkpoint, loaded as saved" in stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == checkpoint and config["r"] == 8  # rank 2r: the correction folded


def test_upstream_peft_reproduces_the_run(bnb_run):
    """PEFT loads the adapter onto the checkpoint its config names, which transformers loads as saved (computing in
    the checkpoint's bf16): our fp32 run's outputs to bf16 precision (~1e-2 over two blocks), where the adapter
    moves them by ~0.9."""
    from peft import AutoPeftModelForCausalLM

    _, out, _, _ = bnb_run
    upstream = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"), device_map="cpu").eval()
    ours, _ = load_run_model(open_run(out))
    base, _ = load_run_model(open_run(out), base_only=True)
    trained, differs = rel(logits(ours), logits(base)), rel(logits(upstream), logits(ours))
    print(f"the adapter moves the logits by {trained:.3f}; upstream PEFT differs from our run by {differs:.1e}")
    assert trained > 0.3
    assert differs < 3e-2


def test_merged_export(bnb_run):
    _, out, _, _ = bnb_run
    assert export_main(["--run", str(out)]) == 0
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain bf16 model: deq(Wq) + the update
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    ours, _ = load_run_model(open_run(out))
    assert rel(logits(merged), logits(ours)) < 1e-2  # the merged weights are rounded to bf16 once


def test_gguf_export_runs_in_llama_cpp(bnb_run):
    _, out, _, _ = bnb_run
    assert export_main(["--run", str(out), "--format", "gguf"]) == 0
    ours, _ = load_run_model(open_run(out))
    worst = compare(llama_cpp_model(out / "gguf" / "model-f16.gguf"), ours, str(out))
    print(f"pre-quantized run: merged f16 GGUF vs transformers, max |logit diff| / std = {worst:.2e}")
    assert worst < LOGIT_TOL


def test_chat_answers_as_the_model_does(bnb_run, capsys):
    _, out, _, _ = bnb_run
    prompt = "3 plus 4 is"
    capsys.readouterr()
    assert chat_main(["--run", str(out), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6"]) == 0
    answer = capsys.readouterr().out.strip()
    model, tokenizer = load_run_model(open_run(out))
    ids = torch.tensor([training_prompt(tokenizer, prompt)])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    assert answer == tokenizer.decode(greedy, skip_special_tokens=True).strip()  # the training-format prompt


def test_resume(bnb_run, tmp_path):
    _, out, argv, _ = bnb_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    stdout = run_finetune([*argv, "--output-dir", str(copy), "--max-steps", "3", "--resume"])
    assert f"resuming from {copy}/checkpoints/checkpoint-2" in stdout
    assert json.loads((copy / "results.json").read_text())["steps"] == 3
