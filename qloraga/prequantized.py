"""Checkpoints saved already quantized by bitsandbytes (`*-bnb-4bit`): what their config says, what qloraga
refuses (8-bit, other methods), and the settings that must agree with them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from qloraga.config import QUANT_STORAGE, RunConfig, option
from qloraga.errors import ConfigError, ModelSourceError


@dataclass(frozen=True)
class Prequantized:
    """A checkpoint saved already quantized by bitsandbytes (the `*-bnb-4bit` repos: its config.json holds the
    `quantization_config`). It is loaded as saved, never re-quantized. Its quantization type and storage are
    fixed by the stored weights; its compute dtype is not (bitsandbytes dequantizes to the input's dtype), so the
    run's `--dtype` sets it, as for a model qloraga quantizes itself."""

    quant_type: str  # nf4 or fp4
    double_quant: bool
    storage: str  # bnb_4bit_quant_storage
    compute_dtype: str  # the dtype the checkpoint's config names

    def describe(self, dtype: str) -> str:
        said = "" if self.compute_dtype == dtype else f" (the checkpoint says {self.compute_dtype}; --dtype sets it)"
        return (f"pre-quantized 4-bit {self.quant_type.upper()} checkpoint, loaded as saved (not re-quantized), "
                f"{dtype} compute{said}")


def prequantized(config: PretrainedConfig, name: str = "the model") -> Prequantized | None:
    """How the checkpoint `config` describes was saved quantized, or None for an unquantized one. 8-bit and other
    quantization methods are refused: the gradient-aligned init and the merged and GGUF exports read the
    dequantized weights of bitsandbytes' 4-bit layers."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ModelSourceError(f"{name} was saved quantized with {method!r}: qloraga fine-tunes unquantized "
                               "checkpoints (which it loads in 4-bit NF4 with --4bit) and bitsandbytes 4-bit ones. "
                               "Give the model's unquantized original.")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ModelSourceError(f"{name} is a bitsandbytes 8-bit checkpoint, which qloraga does not fine-tune (its "
                               "init and exports read the dequantized weights of 4-bit layers). Give the model's "
                               "unquantized original (with --4bit for 4-bit NF4), or a bnb-4bit checkpoint.")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return None
    storage = q.get("bnb_4bit_quant_storage") or "uint8"
    return Prequantized(q.get("bnb_4bit_quant_type") or "fp4", bool(q.get("bnb_4bit_use_double_quant")),
                        str(storage).removeprefix("torch."),
                        str(q.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))


def check_quant_storage(found: Prequantized | None, quant_storage: torch.dtype | None) -> None:
    """A storage dtype asked for must be the pre-quantized checkpoint's own: its weights are stored that way."""
    if found is None or quant_storage is None:
        return
    asked = next((k for k, v in QUANT_STORAGE.items() if v == quant_storage), str(quant_storage))
    if asked != found.storage:
        raise ConfigError(f"{option('quant_storage')} {asked} contradicts the pre-quantized checkpoint, whose 4-bit "
                          f"weights are stored as {found.storage} (it is loaded as saved, not re-quantized): drop "
                          f"{option('quant_storage')}, or give the unquantized original to quantize it with --4bit.")


def weights_description(cfg: RunConfig, config: PretrainedConfig) -> str:
    """How a run's base is held, for its run line and dry run: pre-quantized, 4-bit NF4 by qloraga, or plain."""
    found = prequantized(config)
    if found is not None:
        return found.describe(cfg.dtype)
    return f"4-bit NF4, {cfg.dtype} compute" if cfg.load_in_4bit else cfg.dtype
