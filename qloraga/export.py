"""Export a trained qloraga model: a standard rank-2r PEFT LoRA adapter (`export_adapter`), or a merged bf16
model (`export_merged`).

The trained update is `s (B A - B0 A0)`, i.e. `s [B, -B0] [A; A0]`: a plain LoRA adapter of rank 2r
with `lora_alpha` doubled (the same `s`), which upstream PEFT, vLLM and others load on the untouched
base. The merged model folds in `deq(Wq) + s (B A - B0 A0)`, what training saw, layer by layer.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from qloraga.adapters import ADAPTER, corrected_layers, delta_weight, lora_config
from qloraga.io import atomic_dir, save_json, save_tensors
from qloraga.loading import dequantized_weight, disable_cpu_repacking, is_4bit
from qloraga.targets import short_target_names

SHARD_BYTES = 2 * 2**30


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT-format tensors `<module>.lora_A.weight = [A; A0]`, `<module>.lora_B.weight = [B, -B0]`."""
    tensors = {}
    for name, layer in corrected_layers(model).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        a0, b0 = layer.qloraga_A0.to(a.dtype), layer.qloraga_B0.to(b.dtype)
        tensors[f"{name}.lora_A.weight"] = torch.cat([a, a0], dim=0).detach()
        tensors[f"{name}.lora_B.weight"] = torch.cat([b, -b0], dim=1).detach()
    return tensors


def adapter_config(model: PeftModel) -> LoraConfig:
    layers = corrected_layers(model)
    if not layers:
        raise ValueError("This model has no qloraga adapters: build it with qloraga.get_qloraga_model.")
    peft_config = model.peft_config[ADAPTER]
    base = model.get_base_model()
    names = [n.removeprefix("base_model.model.") for n in layers]
    return lora_config(2 * peft_config.r, 2 * peft_config.lora_alpha, short_target_names(base, names),
                       peft_config.lora_dropout, base_model_name_or_path=getattr(base, "name_or_path", None) or None)


def merged_state(model: PeftModel, dtype: torch.dtype = torch.bfloat16, delta: bool = True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's tensors in `dtype` (bf16), one module at a time (never a full copy of the model).

    `delta=False` gives the dequantized base alone, `deq(Wq)`: what a LoRA adapter applies to."""
    base = model.get_base_model()
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, LoraLayer):
            inner = module.get_base_layer()
            weight = dequantized_weight(inner).float()
            if delta:
                weight = weight + delta_weight(module)
            yield f"{prefix}weight", weight.to(dtype)
            if inner.bias is not None:
                yield f"{prefix}bias", inner.bias.detach().to(dtype)
            return
        if is_4bit(module):
            yield f"{prefix}weight", dequantized_weight(module).to(dtype)
            if module.bias is not None:
                yield f"{prefix}bias", module.bias.detach().to(dtype)
            return
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:  # tied weights are written once
                seen.add(id(param))
                yield f"{prefix}{pname}", param.detach().to(dtype)
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                yield f"{prefix}{bname}", buf.detach()
        for cname, child in module.named_children():
            yield from walk(f"{prefix}{cname}.", child)

    yield from walk("", base)


def write_merged(model: PeftModel, out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in merged_state(model):
        tensor = tensor.detach().cpu()
        if size and size + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_tensors(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(shard, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.nbytes for s in shards for t in s.values())
        save_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                  out / "model.safetensors.index.json")
    config = copy.deepcopy(model.get_base_model().config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    generation_config = getattr(model.get_base_model(), "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)


def export_adapter(model: PeftModel, out_dir: str | os.PathLike, merged: bool | None = None,
                   tokenizer=None) -> Path:
    """Write a portable PEFT LoRA adapter: rank 2r with the correction folded in, or PEFT's own format for a
    model without one (plain LoRA, LoRA-One). For a merged model, call `export_merged`.

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
            save_tensors(adapter_tensors(model), tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            adapter_config(model).save_pretrained(str(tmp))

    return write_folder(model, out_dir, write, tokenizer)


def export_merged(model: PeftModel, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a whole bf16 model with the update folded in, `deq(Wq) + s (B A - B0 A0)` (what training saw),
    loadable without PEFT. The folder appears complete or not at all."""
    return write_folder(model, out_dir, lambda tmp: write_merged(model, tmp), tokenizer)


def write_folder(model: PeftModel, out_dir: str | os.PathLike, write, tokenizer=None) -> Path:
    """`write(tmp)` into a temporary folder (and the tokenizer, if any), renamed to `out_dir` when complete."""
    out_dir = Path(out_dir)
    disable_cpu_repacking(model)
    with atomic_dir(out_dir) as tmp:
        write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
