"""Presets per model family: YAML files in `qloraga/configs/` (package data), data rather than code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qloraga.config import ConfigError, merge_settings

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # inside the package: wheels ship the presets
# transformers' model_type -> preset name.
MODEL_TYPE_PRESETS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                      "gemma2": "gemma", "gemma3_text": "gemma3", "phi3": "phi3", "smollm3": "smollm"}
# A family's preset for its small models: below SMALL_MODEL parameters (SmolLM2-135M/360M is model_type llama)
# the settings measured on SmolLM2-135M (longer sequences, bigger batches, its learning rates) fit better than
# those sized for 7B.
SMALL_MODEL_PRESETS = {"llama": "smollm"}
SMALL_MODEL = 1e9
# A family without a preset: what every model preset agrees on, over the library defaults (the exact SVD of
# every layer is slow at 7B).
SAFE_DEFAULTS = {"lora_ga": {"svd_niter": 4}}


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: malformed YAML ({getattr(exc, 'problem', exc)}).") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of settings, got {type(data).__name__}.")
    return data


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by family name (`llama`, `phi3`, ...) or by the path of a YAML file.

    `extends: NAME` in a preset starts from preset NAME and overrides what the file sets.
    """
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        data = load_yaml(name_or_path)
    else:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"Unknown preset {name_or_path!r}: choose one of "
                              f"{', '.join(available_presets())}, or give the path of a YAML file.")
        data = load_yaml(path)
    parent = data.pop("extends", None)
    return merge_settings(load_preset(parent), data) if parent else data


def detect_preset(model_type: str | None, parameters: float | None = None) -> str | None:
    """The preset for a transformers `model_type` and (where the family has one for small models) its
    parameter count, or None when no family preset fits."""
    small = SMALL_MODEL_PRESETS.get(model_type or "")
    if small and parameters is not None and parameters < SMALL_MODEL:
        return small
    return MODEL_TYPE_PRESETS.get(model_type or "")


def unique_parameters(skeleton) -> dict[str, Any]:
    """A model's parameters by name, a tied output embedding once. On the meta device (a weightless skeleton)
    tied weights are separate tensors, so the tie is read from the config."""
    params = dict(skeleton.named_parameters(remove_duplicate=True))
    if getattr(skeleton.config, "tie_word_embeddings", False):
        head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
        if head is not None and embed is not None and head.weight is not embed.weight:
            params = {n: p for n, p in params.items() if p is not head.weight}
    return params


def parameter_count(config) -> int | None:
    """Parameters of the model a config describes (tied weights once), from a weightless skeleton; None for an
    exotic architecture (the family alone decides)."""
    from qloraga.model_source import model_skeleton

    skeleton = model_skeleton(config)
    return None if skeleton is None else sum(p.numel() for p in unique_parameters(skeleton).values())


def choose_preset(model: str) -> tuple[str | None, str]:
    """The preset for `model` (a folder, .gguf or hub name) from its family and size, and why, in words."""
    if model == "demo":
        return "demo", "the embedded demo model"
    from transformers import AutoConfig

    from qloraga.model_source import model_source

    source = model_source(model)  # a missing local path is an error here, before a note about presets
    try:
        config = AutoConfig.from_pretrained(source)  # a .gguf: its converted folder
    except (OSError, ValueError):
        return None, unknown_family_note(model, None)
    family = config.model_type
    parameters = parameter_count(config)
    preset = detect_preset(family, parameters)
    if preset is None:
        return None, unknown_family_note(model, family)
    size = f"{parameters / 1e6:,.0f}M parameters" if parameters else "size unknown"
    why = f"model_type {family!r}, {size}"
    if preset == SMALL_MODEL_PRESETS.get(family):
        why += f", below {SMALL_MODEL / 1e9:g}B: the small-model settings"
    return preset, why + " (--preset overrides)"


def suggest_preset(model_type: str | None) -> str:
    """The family preset whose name is the longest prefix of `model_type` (`qwen2_moe` -> qwen2), else llama."""
    names = [n for n in available_presets() if n != "demo" and (model_type or "").startswith(n)]
    return max(names, key=len, default="llama")


def unknown_family_note(model: str, model_type: str | None) -> str:
    """One line for a model without a family preset: the settings it gets and the preset to try."""
    what = f"model_type {model_type!r}" if model_type else "a config.json that could not be read"
    settings = ", ".join(f"lora_ga.{k}: {v}" for k, v in SAFE_DEFAULTS["lora_ga"].items())
    return (f"no preset for {model!r} ({what}): using the defaults with {settings}, the init's own learning "
            f"rate, adapters on every linear layer of the decoder blocks; try --preset "
            f"{suggest_preset(model_type)} if its layers match "
            f"(presets: {', '.join(p for p in available_presets() if p != 'demo')}).")
