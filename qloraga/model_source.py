"""The model a run names, resolved and checked before any weight is read: a hub name as it is, or a local
folder checked to hold a config.json and whole safetensors files (a GGUF file converts to one: `gguf_convert`);
its config checked to be a causal LM qloraga can train on; its modules as a weightless skeleton."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from qloraga.config import option
from qloraga.errors import ConfigError, ModelSourceError
from qloraga.gguf_convert import gguf_file, gguf_model_folder
from qloraga.prequantized import prequantized


def looks_like_path(name_or_path: str) -> bool:
    return os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)


def model_source(name_or_path: str | os.PathLike) -> str:
    """A hub name as it is, or a local model folder checked to exist and to hold a config.json.

    A `.gguf` file, or a folder holding exactly one `.gguf` and no config.json, becomes the model folder
    it converts to (dequantized, bf16; once, then cached: see `gguf_model_folder`).
    """
    name = str(name_or_path)
    if not looks_like_path(name):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"{option('model')} {name!r} does not exist: give a folder made by save_pretrained "
                          "(with config.json), a .gguf file or a hub name.")
    gguf = gguf_file(path)
    if gguf is not None:
        return str(gguf_model_folder(gguf))
    if not (path / "config.json").exists():
        raise ModelSourceError(f"{name!r} has no config.json (nor a .gguf file): it is not a transformers model "
                               "folder.")
    return str(path)


def model_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module | None:
    """The model's modules on the meta device (no weights, no memory), or None where that cannot be built."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an exotic architecture: callers fall back to the loaded model or to no size
        return None


def causal_lm_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, checked to describe a causal LM whose weight files are whole and whose quantization,
    if it was saved quantized, qloraga can train on (cheap: no weights are read)."""
    name = model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # transformers' words for a model_type it does not know, or remote code refused
        if trust_remote_code:
            raise ModelSourceError(f"--model {name_or_path}: transformers cannot read its config ({exc}).") from exc
        raise ModelSourceError(f"--trust-remote-code / trust_remote_code is off and transformers cannot read the "
                               f"config of --model {name_or_path} without it ({exc}): if the model ships its own "
                               "code and you trust it, pass --trust-remote-code.") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelSourceError(f"{name!r} is a {config.model_type!r} model, not a causal language model: qloraga "
                               "fine-tunes decoder-only LMs (those AutoModelForCausalLM loads).")
    if Path(name).is_dir():
        check_safetensors(Path(name))
    prequantized(config, name)
    return config


def check_safetensors(folder: Path) -> None:
    """Every safetensors file of a model folder holds the bytes its header promises, and every shard its index
    names is there: a download cut short is named here, not by a SafetensorError from deep inside the loader.
    Reads the headers only."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelSourceError(f"{index} is damaged (not a safetensors index with a weight_map): download or "
                                   "copy it again.") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelSourceError(f"{folder} is incomplete: {index.name} names {', '.join(missing)}, which "
                                   "is not there. Download or copy the missing shard(s).")
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ModelSourceError(f"{file} is damaged or incomplete ({problem}): download or copy it again.")


def safetensors_problem(file: Path) -> str | None:
    """What safetensors itself finds wrong with a file's header or length (it checks that the header's byte
    ranges cover the file exactly when it opens one, reading no tensor), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except SafetensorError as exc:
        return str(exc)
