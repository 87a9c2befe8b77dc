"""The portable PEFT adapter of a trained qloraga model (`export_adapter`), and the one rank-2r fold.

The trained update is `s (B A - B0 A0)`, i.e. `s [B, -B0] [A; A0]`: a plain LoRA adapter of rank 2r
with `lora_alpha` doubled (the same `s`), which upstream PEFT, vLLM and others load on the untouched
base. `fold_correction` is that identity on tensors; a live model (`adapter_tensors`) and a training
checkpoint (`runs.checkpoint_adapter`) both go through it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from qloraga.adapters import (
    A0_BUFFER,
    ADAPTER,
    B0_BUFFER,
    OFFSET_ROWS,
    PEFT_PREFIX,
    corrected_layers,
    lora_config,
    rank_patterns,
)
from qloraga.errors import ModelSourceError
from qloraga.export.folder import write_folder
from qloraga.export.merged import export_merged
from qloraga.io import save_tensors
from qloraga.targets import short_target_names


def fold_correction(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` trained from the frozen `(A0, B0)` -> the rank-2r pair `([A; A0], [B, -B0])`, whose product
    `B A - B0 A0` is the trained update (at the same scaling once alpha is doubled with r)."""
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)


def frozen_part(layer, original: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's frozen `(A0, B0)`; for the unquantized original (`original`), without the rows of the
    quantization-error fit (`adapters.OFFSET_ROWS`): weights that never had the error must not get its fit."""
    a0, b0 = getattr(layer, A0_BUFFER), getattr(layer, B0_BUFFER)
    keep = a0.shape[0] - (getattr(layer, OFFSET_ROWS, 0) if original else 0)
    return a0[:keep], b0[:, :keep]


def adapter_tensors(model: PeftModel, original: bool = False) -> dict[str, torch.Tensor]:
    """PEFT-format tensors `<module>.lora_A.weight = [A; A0]`, `<module>.lora_B.weight = [B, -B0]` (`original`:
    `frozen_part`'s A0, B0, which may have no row left)."""
    tensors = {}
    for name, layer in corrected_layers(model).items():
        a, b = fold_correction(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                               *frozen_part(layer, original))
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a.detach(), b.detach()
    return tensors


def adapter_config(model: PeftModel, original: bool = False) -> LoraConfig:
    """The folded adapter's config: each layer's rank is its trained rank plus its frozen rows (2r for LoRA-GA's
    correction or LoRA-One's error fit, 3r for both), alpha grown with it (the same scaling)."""
    layers = corrected_layers(model)
    if not layers:
        raise ModelSourceError("This model has no qloraga adapters: build it with qloraga.get_qloraga_model.")
    peft_config = model.peft_config[ADAPTER]
    base = model.get_base_model()
    names = [n.removeprefix(PEFT_PREFIX) for n in layers]
    ranks = {n: layers[PEFT_PREFIX + n].r[ADAPTER] + frozen_part(layers[PEFT_PREFIX + n], original)[0].shape[0]
             for n in names}
    trained = {n: layers[PEFT_PREFIX + n].r[ADAPTER] for n in names}
    r = next((ranks[n] for n in names if trained[n] == peft_config.r), 2 * peft_config.r)
    scaling = peft_config.lora_alpha / peft_config.r
    return lora_config(r, peft_config.lora_alpha * r / peft_config.r, short_target_names(base, names),
                       peft_config.lora_dropout,
                       base_model_name_or_path=getattr(base, "name_or_path", None) or None,
                       **rank_patterns(ranks, r, scaling))


def export_adapter(model: PeftModel, out_dir: str | os.PathLike, merged: bool | None = None,
                   tokenizer=None, original: bool = False) -> Path:
    """Write a portable PEFT LoRA adapter: rank 2r with the correction folded in, or PEFT's own format for a
    model without one (plain LoRA, LoRA-One). For a merged model, call `export_merged`.

    With the quantization-error fit (`quant_error`) the adapter is for the 4-bit base, which has the error;
    `original=True` writes the adapter for the unquantized weights it was quantized from: the fit left out.

    The folder appears complete or not at all (written under a temporary name, then renamed).
    `merged=True` (deprecated) still writes a merged model.
    """
    if merged is not None:
        warnings.warn("export_adapter(..., merged=...) is deprecated: call qloraga.export_merged(model, out_dir) "
                      "for a merged model, export_adapter(model, out_dir) for an adapter.",
                      DeprecationWarning, stacklevel=2)
        if merged:
            return export_merged(model, out_dir, tokenizer=tokenizer)

    def write(tmp: Path) -> None:
        if not corrected_layers(model):  # plain LoRA or LoRA-One: PEFT's own format is already portable
            model.save_pretrained(str(tmp))
        else:
            save_tensors(adapter_tensors(model, original), tmp / "adapter_model.safetensors",
                         metadata={"format": "pt"})
            adapter_config(model, original).save_pretrained(str(tmp))

    return write_folder(model, out_dir, write, tokenizer)
