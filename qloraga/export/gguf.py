"""GGUF export for llama.cpp, Ollama and LM Studio: a LoRA adapter, the merged model (f16, q8_0), a Modelfile.

- `adapter.gguf`: the rank-2r adapter `[A; A0]`, `[B, -B0]` (the LoRA-GA correction folded in) in llama.cpp's
  adapter format (`general.type = adapter`, `adapter.lora.alpha`), for a base GGUF of the same model;
- `adapter-original.gguf` (a --quant-error run): the same without the quantization-error fit, for a GGUF of the
  original weights, which never had the error (`adapter.gguf` is for the dequantized 4-bit base, `base-f16.gguf`);
- `model-f16.gguf`, `model-q8_0.gguf`: the merged weights `deq(Wq) + delta` (export.merged.merged_state, computed in
  fp32 and rounded once), with the tokenizer, its special tokens and the chat template in the metadata;
- `Modelfile` for `ollama create`.

Families: llama, mistral (llama.cpp's `llama` architecture, whose rotary convention permutes the rows of
q_proj and k_proj as llama.cpp's convert_hf_to_gguf.py does; the adapter's lora_b rows get the same
permutation) and qwen2. Tokenizers: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM pre-tokenizers).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer

from qloraga.adapters import ADAPTER, ORIGINAL, PEFT_PREFIX, corrected_layers, has_error_fit
from qloraga.errors import GGUFExportError
from qloraga.export.merged import merged_state
from qloraga.io import atomic_file
from qloraga.prompt_frame import Frame, rendering

FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # model_type -> llama.cpp architecture
PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")  # rows permuted for the `llama` architecture

LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def gguf_module():
    try:
        import gguf
    except ImportError as exc:
        raise GGUFExportError("GGUF export needs the gguf package: pip install 'gguf>=0.17'.") from exc
    return gguf


def architecture(config) -> str:
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise GGUFExportError(f"GGUF export supports the {', '.join(sorted(FAMILIES))} families; this model is "
                              f"{family!r}. Export the merged folder (--format merged) and convert it with "
                              "llama.cpp's convert_hf_to_gguf.py.")
    return FAMILIES[family]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: rotary pairs (i, i + d/2) of each head become adjacent rows."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def rows_permuted(name: str, tensor: torch.Tensor, config, arch: str) -> torch.Tensor:
    """Apply the `llama` architecture's row permutation to q_proj / k_proj weights (or lora_b) of `name`."""
    if arch != "llama":
        return tensor
    if f"{PERMUTED[0]}." in name or name.endswith(PERMUTED[0]):
        return permute(tensor, config.num_attention_heads)
    if f"{PERMUTED[1]}." in name or name.endswith(PERMUTED[1]):
        return permute(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def rope_settings(config) -> tuple[float, dict]:
    """(rope theta, rope scaling dict or {}) from a transformers 4 or 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {}) or params
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), ({} if kind in (None, "default") else {**scaling, "rope_type": kind})


def llama3_rope_factors(config, theta: float, scaling: dict) -> torch.Tensor:
    """The `rope_freqs` tensor of llama.cpp for Llama 3.1+ rope scaling (as convert_hf_to_gguf.py computes it)."""
    dim = head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def add_hyperparameters(writer, config, name: str) -> dict[str, torch.Tensor]:
    """Architecture metadata; returns extra tensors the architecture needs (llama3 rope factors)."""
    gguf = gguf_module()
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    extra = {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "llama3" and architecture(config) == "llama":
        extra["rope_freqs.weight"] = llama3_rope_factors(config, theta, scaling)
    elif kind is not None:
        raise GGUFExportError(f"rope scaling {kind!r} is not supported by this GGUF export (linear and llama3 are).")
    return extra


# ---------------------------------------------------------------- tokenizer


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level BPE tokenizer.json, or GGUFExportError."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"The tokenizer is a {model.get('type')!r} model: GGUF export supports byte-level BPE "
                              "tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style). The embedded demo's word-level "
                              "tokenizer has no GGUF equivalent: export the merged folder instead.")
    pre = spec.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [i.get("type") for i in items]
    byte_level = items[-1] if items and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise GGUFExportError("GGUF export supports byte-level BPE tokenizers (a ByteLevel pre-tokenizer without "
                              f"prefix space); this one has pre-tokenizers {kinds}.")
    regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not regex:
        pattern = (items[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_REGEX:
            return "llama-bpe"
        if pattern == QWEN2_REGEX:
            return "qwen2"
    raise GGUFExportError(f"Unknown byte-level pre-tokenizer {kinds}: GGUF export knows the GPT-2, Llama 3, "
                          "Qwen2 and SmolLM ones. Convert the merged folder with llama.cpp's convert_hf_to_gguf.py.")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Tokens, merges, special tokens and the chat template, as llama.cpp's `gpt2` tokenizer model reads them."""
    gguf = gguf_module()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise GGUFExportError(f"The tokenizer has {len(vocab)} tokens but the model's vocab_size is {vocab_size}.")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        tokens.append(text)
        if i in special or (text in added and added[text].special):
            types.append(gguf.TokenType.CONTROL)
        elif text in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="qloraga-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        special_vocab = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    probe = tokenizer("a")["input_ids"]  # does the tokenizer itself add BOS / EOS (its post-processor)?
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special_vocab.add_special_token["bos"] = bos is not None and bool(probe) and probe[0] == bos
    special_vocab.add_special_token["eos"] = eos is not None and bool(probe) and probe[-1] == eos
    special_vocab.chat_template = getattr(tokenizer, "chat_template", None) or special_vocab.chat_template
    special_vocab.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------- model files


def gguf_tensors(model: PeftModel, config, arch: str, merged: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) of the merged model (or the dequantized base with `merged=False`)."""
    gguf = gguf_module()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     config.num_hidden_layers)
    for name, tensor in merged_state(model, dtype=torch.float32, delta=merged):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"No GGUF name for tensor {name!r} of this {config.model_type} model.")
        yield target, rows_permuted(name, tensor, config, arch)


def encode(tensor: torch.Tensor, kind: str):
    """numpy data (copied to the CPU from the model's device) and GGML type: 1-D tensors stay f32; matrices
    become f16, or q8_0 where rows allow. Every tensor a GGUF file holds goes through here."""
    gguf = gguf_module()
    data = tensor.detach().cpu().float().numpy()
    if data.ndim == 1 or kind == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def finish(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model_gguf(model: PeftModel, tokenizer, path: str | os.PathLike, kind: str = "f16",
                     merged: bool = True) -> Path:
    """A complete GGUF model: merged weights (or with `merged=False` the dequantized base the adapter was
    trained on), hyperparameters, tokenizer and chat template. `kind`: f16, q8_0 or f32."""
    gguf = gguf_module()
    config = model.get_base_model().config
    arch = architecture(config)
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
        name = Path(str(getattr(config, "_name_or_path", "") or "model")).name
        extra = add_hyperparameters(writer, config, name)
        file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "f32": gguf.LlamaFileType.ALL_F32}[kind]
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        for gguf_name, tensor in extra.items():
            data, qtype = encode(tensor, "f32")
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        for gguf_name, tensor in gguf_tensors(model, config, arch, merged):
            data, qtype = encode(tensor, kind)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        finish(writer, tmp)
    return path


def lora_pairs(model: PeftModel, original: bool = False) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(module name, lora_A (2r, in), lora_B (out, 2r), scaling) of every LoRA layer, correction folded in;
    `original`: for the unquantized original weights (a live model's fit left out, or the ORIGINAL adapter that
    `runs.load_run_model(original=True)` loads beside the run's)."""
    from qloraga.export.adapter import adapter_tensors

    base = model.get_base_model()
    adapter = ORIGINAL if original and ORIGINAL in model.peft_config else ADAPTER
    corrected = adapter_tensors(model, original) if corrected_layers(model) else {}
    for name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        key = f"{PEFT_PREFIX}{name}"
        if f"{key}.lora_A.weight" in corrected:
            a, b = corrected[f"{key}.lora_A.weight"], corrected[f"{key}.lora_B.weight"]
        else:
            a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        yield name, a.float(), b.float(), float(layer.scaling[adapter])


def write_adapter_gguf(model: PeftModel, path: str | os.PathLike, original: bool = False) -> Path:
    """llama.cpp's LoRA adapter format: `<gguf weight>.lora_a` (r, in), `.lora_b` (out, r), one alpha for the
    file (`original`: `lora_pairs`' adapter for the unquantized original weights). llama.cpp scales each layer
    by `alpha / rank`, its rank read from that layer's tensors, so layers of different ranks (a gradient
    allocation) load as they are; a layer whose `s * rank` is not the file's alpha (e.g. every layer at one
    scaling s but different ranks) has the ratio folded into its lora_b."""
    gguf = gguf_module()
    config = model.get_base_model().config
    arch = architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     config.num_hidden_layers)
    pairs = list(lora_pairs(model, original))
    if not pairs:
        raise GGUFExportError("This model has no LoRA adapter to export.")
    alpha = pairs[0][3] * pairs[0][1].shape[0]  # the first layer's s * rank; the others' ratio goes into lora_b
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, a, b, scaling in pairs:
            target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if target is None:
                raise GGUFExportError(f"No GGUF name for adapted layer {name!r}.")
            ratio = scaling * a.shape[0] / alpha  # llama.cpp computes (alpha / rank) B A: 1 unless s * rank differs
            for suffix, tensor in (("lora_a", a), ("lora_b", rows_permuted(name, b, config, arch) * ratio)):
                data, qtype = encode(tensor, "f32")  # to the CPU: the adapter lives on the model's device
                writer.add_tensor(f"{target}.{suffix}", data, raw_dtype=qtype)
        finish(writer, tmp)
    return path


# ---------------------------------------------------------------- Ollama


CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
          "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
          "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
MISTRAL = ("{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}[INST] {{ if and $.System "
           "(eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
           "{{- else if eq .Role \"assistant\" }} {{ .Content }}{{ end }}{{- end }}")


def ollama_template(chat_template: str | None, eos: str) -> tuple[str | None, list[str]]:
    """Ollama's Go template and stop strings for the chat templates it can express, else (None, [eos])."""
    from qloraga.formats import FALLBACK_CHAT_TEMPLATE

    template = chat_template or ""
    if "<|im_start|>" in template:
        return CHATML, ["<|im_start|>", "<|im_end|>"]
    if "<|start_header_id|>" in template:
        return LLAMA3, ["<|start_header_id|>", "<|eot_id|>"]
    if "[INST]" in template:
        return MISTRAL, ["[INST]", "[/INST]"]
    if template == FALLBACK_CHAT_TEMPLATE:
        go = ("{{- if .System }}<|system|>\n{{ .System }}EOS\n{{ end }}{{- range .Messages }}<|{{ .Role }}|>\n"
              "{{ .Content }}EOS\n{{ end }}<|assistant|>\n").replace("EOS", eos)
        return go, [eos, "<|user|>"]
    return None, [eos] if eos else []


def training_template(fmt: str, tokenizer, frame: Frame | None = None) -> str:
    """Ollama's template for a run trained on prompt-completion, alpaca or text data: the message (`.Prompt`)
    in that format's prompt, as training rendered it (`formats.generation_prompt`), inside the training prompts'
    `frame`; llama.cpp adds the BOS."""
    from qloraga.formats import generation_prompt

    message = frame.wrap("{{ .Prompt }}") if frame else "{{ .Prompt }}"
    return generation_prompt([{"role": "user", "content": message}], fmt, tokenizer)


def write_modelfile(tokenizer, path: str | os.PathLike, model_file: str = "./model-q8_0.gguf",
                    fmt: str = "messages", frame: Frame | None = None) -> Path:
    """An Ollama Modelfile whose prompts are rendered as the run's training (on `fmt` data) rendered them, a
    message inside the training prompts' `frame`, which its first line states."""
    from qloraga.formats import CHAT_FORMATS

    eos = tokenizer.eos_token or ""
    if fmt in CHAT_FORMATS:
        template, stops = ollama_template(getattr(tokenizer, "chat_template", None), eos)
    else:
        template, stops = training_template(fmt, tokenizer, frame), [eos]
    frame = None if fmt in CHAT_FORMATS else frame
    said = f"# Prompts are rendered as the run trained: {rendering(fmt, frame, 'qloraga export --no-frame')}."
    lines = [*([said] if frame else []), f"FROM {model_file}",  # a frame: the first thing a reader sees
             "# or the adapter on a base GGUF of the same model: FROM /path/to/base.gguf + ADAPTER ./adapter.gguf",
             *([] if frame else [said]), ""]
    if template is None:
        lines += ["# The chat template could not be expressed as an Ollama template: Ollama uses the one in the",
                  "# GGUF metadata (tokenizer.chat_template) where it recognises it. Add a TEMPLATE here if not.", ""]
    else:
        lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(s for s in stops if s)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def sentencepiece_like(spec: dict) -> bool:
    """A BPE with byte fallback (Llama 2, Mistral 7B): llama.cpp has it (from tokenizer.model), this export not."""
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def export_gguf(model: PeftModel, tokenizer, out_dir: str | os.PathLike, base: bool = False,
                fmt: str = "messages", frame: Frame | None = None) -> list[Path]:
    """Write `adapter.gguf`, `model-f16.gguf`, `model-q8_0.gguf` and `Modelfile` into `out_dir`; with `base`
    also `base-f16.gguf`, the dequantized base the adapter was trained on (for llama.cpp's --lora); with a
    quantization-error fit also `adapter-original.gguf`, for a GGUF of the original weights. The Modelfile
    renders prompts as training on `fmt` data did, inside the training prompts' `frame`.

    A SentencePiece-style tokenizer (BPE with byte fallback) gets `adapter.gguf` alone, for a base GGUF made by
    llama.cpp's convert_hf_to_gguf.py (a warning says so). Returns the files written."""
    out_dir = Path(out_dir)
    architecture(model.get_base_model().config)  # refuse an unsupported family before writing anything
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    adapter_only = sentencepiece_like(spec)
    if not adapter_only:
        pre_tokenizer(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_adapter_gguf(model, out_dir / "adapter.gguf")]
    if has_error_fit(model):
        written.append(write_adapter_gguf(model, out_dir / "adapter-original.gguf", original=True))
    if adapter_only:
        warnings.warn("This SentencePiece-style tokenizer cannot be written to GGUF here: only adapter.gguf was "
                      "written, for a base GGUF of the same model made by llama.cpp's convert_hf_to_gguf.py. For "
                      "the merged model, convert the merged folder (export --format merged) with that script.",
                      stacklevel=2)
        return written
    written.append(write_model_gguf(model, tokenizer, out_dir / "model-f16.gguf", "f16"))
    written.append(write_model_gguf(model, tokenizer, out_dir / "model-q8_0.gguf", "q8_0"))
    if base:
        written.append(write_model_gguf(model, tokenizer, out_dir / "base-f16.gguf", "f16", merged=False))
    written.append(write_modelfile(tokenizer, out_dir / "Modelfile", fmt=fmt, frame=frame))
    return written


def check_gguf_run(run) -> None:
    """Refuse a run whose model family or tokenizer GGUF export does not cover, before any weight is loaded."""
    from qloraga.model_source import causal_lm_config

    architecture(causal_lm_config(run.config.model, run.config.trust_remote_code))
    spec = json.loads(run.tokenizer().backend_tokenizer.to_str())
    if not sentencepiece_like(spec):
        pre_tokenizer(spec)
