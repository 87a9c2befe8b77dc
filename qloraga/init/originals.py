"""Where the weights before quantization come from, for the quantization-error fit (`error_fit.py`).

A model qloraga quantized itself (`--4bit`) was read from safetensors that still hold its unquantized weights:
they are read again one layer at a time (a layer's fp32 copy, never the whole model). A GGUF source was
converted to such a folder, so its originals are the GGUF file's dequantized weights (said in `source`). A
pre-quantized bnb-4bit checkpoint holds no original: refused, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qloraga.config import option
from qloraga.errors import ModelSourceError
from qloraga.gguf_convert import gguf_cache_dir
from qloraga.prequantized import prequantized

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")


class Originals:
    """`originals(name)`: the unquantized fp32 weight (out x in) of the linear layer `name`, read from the
    checkpoint's safetensors when asked; `source` says where they come from, for the init's summary line."""

    def __init__(self, folder: str | Path, source: str | None = None):
        self.folder = Path(folder)
        self.files = weight_map(self.folder)
        self.source = source or f"the weights before quantization, read from {self.folder}"

    def key(self, name: str) -> str:
        """The checkpoint's key of a module's weight: its own name, or the one key that ends with it (a
        checkpoint saved without the `model.` prefix, or a wrapped model's longer module names)."""
        key = f"{name}.weight"
        if key in self.files:
            return key
        parts = key.split(".")
        for start in range(1, len(parts) - 1):
            tail = ".".join(parts[start:])
            found = [k for k in self.files if k == tail or k.endswith("." + tail)]
            if len(found) == 1:
                return found[0]
        raise ModelSourceError(f"{self.folder} holds no weight for layer {name} (no key {key}): the quantization-"
                               f"error fit ({option('lora_ga.quant_error')}) needs the checkpoint the model was "
                               "loaded from.")

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self.key(name)
        with safe_open(str(self.folder / self.files[key]), framework="pt") as f:
            weight = f.get_tensor(key)
        if not weight.is_floating_point():
            raise ModelSourceError(f"{key} in {self.folder} is stored as {weight.dtype}, not as unquantized weights: "
                                   f"{option('lora_ga.quant_error')} needs an unquantized checkpoint.")
        return weight.float()


def weight_map(folder: Path) -> dict[str, str]:
    """`{tensor key: file}` of a model folder's safetensors (its index, or its one file's header)."""
    index = folder / WEIGHT_FILES[0]
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{folder} holds no safetensors file, so the weights before quantization cannot be "
                               f"read: {option('lora_ga.quant_error')} needs a safetensors checkpoint.")
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found.update(dict.fromkeys(f.keys(), file.name))
    return found


def model_folder(model: nn.Module) -> Path:
    """The local folder the model was loaded from (a hub name: its snapshot in the hub cache)."""
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    if name and Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except Exception as exc:  # not a hub name, or not in the cache
        raise ModelSourceError(f"The model's checkpoint ({name or 'unknown'}) is not a local folder, so the weights "
                               f"before quantization cannot be read for {option('lora_ga.quant_error')}: load the "
                               "model from a folder of safetensors (or pass originals=).") from exc


def original_weights(model: nn.Module) -> Originals:
    """The weights `model` was quantized from. A pre-quantized bnb-4bit checkpoint has none: refused."""
    from transformers import AutoConfig

    folder = model_folder(model)
    # The checkpoint's own config: a model transformers quantized while loading carries a quantization_config too.
    if prequantized(AutoConfig.from_pretrained(folder)) is not None:
        raise ModelSourceError(f"{folder} is a pre-quantized bnb-4bit checkpoint: it holds no weights from before "
                               f"quantization, so {option('lora_ga.quant_error')} has no error to fit. Give its "
                               "unquantized original with --4bit, or drop the option.")
    if gguf_cache_dir().resolve() in folder.resolve().parents:
        return Originals(folder, "the GGUF file's dequantized weights (the GGUF is the only original there is)")
    return Originals(folder)
