"""GGUF export checked by llama.cpp itself (llama-cpp-python), on tiny llama, mistral and qwen2 runs with a
byte-level BPE tokenizer: the merged f16 GGUF gives transformers' next-token logits and greedy continuations,
the base GGUF plus adapter.gguf reproduces the PEFT adapter on the dequantized base, q8_0 loads and agrees
roughly, the tokenizer and chat template survive, unsupported families and tokenizers are refused."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from conftest import CHATML, GGUF_VOCAB, byte_level_tokenizer, make_batches, save_family
from peft import PeftModel
from reference import (
    EXACT_TOL,
    LOGIT_TOL,
    PROMPTS,
    compare,
    cpp_logits,
    hf_logits,
    llama_cpp_model,
    prompt_ids,
)
from tokenizers import Tokenizer, decoders, models, trainers
from transformers import PreTrainedTokenizerFast

from qloraga import QLoraGAConfig, get_qloraga_model, load_model
from qloraga.cli.export import main as export_main
from qloraga.config import RunConfig
from qloraga.export import export_adapter
from qloraga.export.gguf import GGUFExportError, ollama_template, pre_tokenizer, write_model_gguf
from qloraga.runs import ORIGINAL_ADAPTER

gguf = pytest.importorskip("gguf")

def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama 2 style tokenizer.json: BPE with byte fallback, `▁` for spaces."""
    from tokenizers import normalizers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([f"{a} plus {b} is {a + b}" for a in range(30) for b in range(30)],
                            trainers.BpeTrainer(vocab_size=GGUF_VOCAB - 8, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def make_run(family: str, root, tokenizer=byte_level_tokenizer, quant_error: str = "off") -> tuple[str, PeftModel]:
    """A run folder as finetune writes it (config.yaml, adapter/; adapter-original/ with `quant_error`), with
    adapters moved away from their init."""
    model_dir = save_family(family, root / "model", tokenizer)
    run = root / "run"
    run.mkdir()
    cfg = RunConfig(model=model_dir, load_in_4bit=True, dtype="float32", output_dir=str(run), dataset_format="messages")
    cfg.lora_ga = QLoraGAConfig(r=4, lora_alpha=8, adapter_dtype="float32", progress=False, quant_error=quant_error)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    base = load_model(model_dir, load_in_4bit=True, dtype=torch.float32)
    batches = make_batches(seed=1)
    for b in batches:
        b["input_ids"] = b["input_ids"] * 2 % GGUF_VOCAB
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    model = get_qloraga_model(base, cfg.lora_ga, batches)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": the adapters move, so the correction and delta are not trivial
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean().clamp_min(1e-3) * 0.5)
    export_adapter(model, run / "adapter", tokenizer=PreTrainedTokenizerFast.from_pretrained(model_dir))
    if quant_error != "off":
        export_adapter(model, run / ORIGINAL_ADAPTER, original=True)
    return str(run), model.eval()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    run, model = make_run(request.param, root)
    assert export_main(["--run", run, "--format", "gguf", "--gguf-base"]) == 0
    return request.param, run, model


def greedy_cpp(llm, ids: list[int], n: int = 16) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(cpp_logits(llm, out)[-1].argmax()))
    return out[len(ids):]


def greedy_hf(model, ids: list[int], n: int = 16) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logits(model, out)[-1].argmax()))
    return out[len(ids):]


def test_files_and_metadata(exported):
    family, run, _ = exported
    out = os.path.join(run, "gguf")
    assert sorted(os.listdir(out)) == ["Modelfile", "adapter.gguf", "base-f16.gguf", "model-f16.gguf",
                                       "model-q8_0.gguf"]
    reader = gguf.GGUFReader(os.path.join(out, "model-f16.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert fields["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == CHATML
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(run, "adapter"))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    adapter = gguf.GGUFReader(os.path.join(out, "adapter.gguf"))
    assert adapter.fields["general.type"].contents() == "adapter"
    assert adapter.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)  # 2 * alpha, rank 2r = 8
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in adapter.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8)  # GGML order: (in, 2r)
    with open(os.path.join(out, "Modelfile")) as f:
        modelfile = f.read()
    assert modelfile.startswith("FROM ./model-q8_0.gguf") and "<|im_start|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_merged_f16_matches_transformers(exported):
    family, run, model = exported
    llm = llama_cpp_model(os.path.join(run, "gguf", "model-f16.gguf"))
    for text, ids in zip(PROMPTS, prompt_ids(run), strict=True):  # llama.cpp tokenizes as the HF tokenizer does
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.detokenize(prompt_ids(run)[3]).decode() == PROMPTS[3]
    worst = compare(llm, model, run)
    print(f"{family}: merged f16 GGUF vs transformers, max |logit diff| / std = {worst:.2e}")
    assert worst < LOGIT_TOL
    for ids in prompt_ids(run):
        assert greedy_cpp(llm, ids) == greedy_hf(model, ids)


def test_merged_f32_is_exact(exported, tmp_path):
    family, run, model = exported
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(run, "adapter"))
    llm = llama_cpp_model(write_model_gguf(model, tok, tmp_path / "merged-f32.gguf", "f32"))
    worst = compare(llm, model, run)
    print(f"{family}: merged f32 GGUF vs transformers, max |logit diff| / std = {worst:.2e}")
    assert worst < EXACT_TOL


def test_base_plus_adapter_matches_peft(exported, tmp_path):
    family, run, model = exported
    adapter = os.path.join(run, "gguf", "adapter.gguf")
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(run, "adapter"))
    base32 = write_model_gguf(model, tok, tmp_path / "base-f32.gguf", "f32", merged=False)
    worst = compare(llama_cpp_model(base32, lora=adapter), model, run)
    print(f"{family}: base f32 GGUF + adapter.gguf vs PEFT adapter, max |logit diff| / std = {worst:.2e}")
    assert worst < EXACT_TOL  # the rank-2r adapter with permuted q/k rows is exactly the trained update
    llm = llama_cpp_model(os.path.join(run, "gguf", "base-f16.gguf"), lora=adapter)
    worst = compare(llm, model, run)
    print(f"{family}: base f16 GGUF + adapter.gguf vs PEFT adapter, max |logit diff| / std = {worst:.2e}")
    assert worst < LOGIT_TOL
    for ids in prompt_ids(run):  # the same fine-tuned answers
        assert greedy_cpp(llm, ids) == greedy_hf(model, ids)
    base = llama_cpp_model(base32)
    with model.disable_adapter():  # without the adapter, llama.cpp's base is the dequantized base
        assert compare(base, model, run) < EXACT_TOL
    assert compare(base, model, run) > 10 * LOGIT_TOL  # and the adapter does change the model


def test_quant_error_run_has_a_gguf_adapter_for_each_base(tmp_path):
    """A --quant-error run: adapter.gguf on the dequantized 4-bit base reproduces the run (the fit included);
    adapter-original.gguf on a GGUF of the original weights computes what upstream PEFT computes with
    adapter-original/ on those weights (no fit: they never had the error), where adapter.gguf would not."""
    run, model = make_run("llama", tmp_path, quant_error="activation")
    assert export_main(["--run", run, "--format", "gguf"]) == 0
    out = os.path.join(run, "gguf")
    assert "adapter-original.gguf" in os.listdir(out)
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(run, "adapter"))
    base32 = write_model_gguf(model, tok, tmp_path / "base-f32.gguf", "f32", merged=False)
    assert compare(llama_cpp_model(base32, lora=os.path.join(out, "adapter.gguf")), model, run) < EXACT_TOL
    unquantized = load_model(str(tmp_path / "model"), load_in_4bit=False, dtype=torch.float32)
    original = PeftModel.from_pretrained(unquantized, os.path.join(run, ORIGINAL_ADAPTER)).eval()
    original32 = write_model_gguf(original, tok, tmp_path / "original-f32.gguf", "f32", merged=False)
    worst = compare(llama_cpp_model(original32, lora=os.path.join(out, "adapter-original.gguf")), original, run)
    print(f"original f32 GGUF + adapter-original.gguf vs PEFT adapter-original/, max |logit diff| / std = {worst:.2e}")
    assert worst < EXACT_TOL
    assert compare(llama_cpp_model(original32, lora=os.path.join(out, "adapter.gguf")), original, run) > 10 * EXACT_TOL


def test_q8_0_loads_and_agrees(exported):
    family, run, model = exported
    llm = llama_cpp_model(os.path.join(run, "gguf", "model-q8_0.gguf"))
    worst = compare(llm, model, run)
    print(f"{family}: merged q8_0 GGUF vs transformers, max |logit diff| / std = {worst:.2e}")
    assert worst < 0.3  # q8_0 rounds every weight block to 8 bits: a loose check that it loads and computes


def test_refuses_unsupported(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(GGUFExportError, match="WordLevel"):
        pre_tokenizer({"model": {"type": "WordLevel"}})
    with pytest.raises(GGUFExportError, match="byte-level"):
        pre_tokenizer({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}})
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(model=tiny_model_dir("phi3"), load_in_4bit=True, dtype="float32")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert export_main(["--run", str(run), "--format", "gguf"]) == 2
    assert "llama, mistral, qwen2" in capsys.readouterr().err


def test_sentencepiece_tokenizer_gets_the_adapter_only(tmp_path, capsys):
    run, _ = make_run("llama", tmp_path, sentencepiece_like_tokenizer)
    with pytest.warns(UserWarning, match="only adapter.gguf"):
        assert export_main(["--run", run, "--format", "gguf"]) == 0
    assert os.listdir(os.path.join(run, "gguf")) == ["adapter.gguf"]
    assert "adapter.gguf." in capsys.readouterr().out


def test_ollama_templates():
    from qloraga.formats import FALLBACK_CHAT_TEMPLATE

    assert ollama_template(CHATML, "<|im_end|>")[1] == ["<|im_start|>", "<|im_end|>"]
    go, stops = ollama_template(FALLBACK_CHAT_TEMPLATE, "</s>")
    assert "{{ .Content }}</s>" in go and "</s>" in stops
    assert ollama_template("{{ something else }}", "</s>") == (None, ["</s>"])


@pytest.mark.parametrize(("fmt", "record"), [("prompt-completion", {"prompt": "Tom has 3 apples", "completion": ""}),
                                             ("alpaca", {"instruction": "Tom has 3 apples", "output": ""})])
def test_modelfile_renders_prompts_as_training_did(tmp_path, fmt, record):
    """A run on prompt-completion or alpaca data: Ollama's template puts the message where training put the
    prompt (no chat template), and says so."""
    from qloraga.export.gguf import write_modelfile
    from qloraga.formats import render

    tok = byte_level_tokenizer()
    modelfile = write_modelfile(tok, tmp_path / "Modelfile", fmt=fmt).read_text()
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    assert template.replace("{{ .Prompt }}", "Tom has 3 apples") == render(record, fmt, tok)[0][0]
    assert f"rendered as the run trained: {fmt}" in modelfile and "<|im_start|>" not in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile  # the EOS training closed each example with
