"""A merged model: `deq(Wq) + s (B A - B0 A0)`, what training saw, layer by layer, as bf16 safetensors
shards that load without PEFT (`export_merged`)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from qloraga.adapters import delta_weight
from qloraga.export.folder import write_folder
from qloraga.io import save_json, save_tensors
from qloraga.loading import dequantized_weight, is_4bit

SHARD_BYTES = 2 * 2**30


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


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Safetensors shards of at most `shard_bytes` (a larger tensor gets one of its own), each written as
    soon as it fills, so host memory holds one shard and not the model; the files get their names
    (`model-00001-of-0000N.safetensors`, or `model.safetensors` alone) once the count is known."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out / f".shard-{len(written) + 1}.safetensors"
        save_tensors(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        tensor = tensor.detach().cpu()
        if shard and size + tensor.nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        fname = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / fname)
        weight_map.update(dict.fromkeys(names, fname))
    save_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / "model.safetensors.index.json")


def write_merged(model: PeftModel, out: Path) -> None:
    write_shards(merged_state(model), out, SHARD_BYTES)  # read here, so a test or bench can set it
    config = copy.deepcopy(model.get_base_model().config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    generation_config = getattr(model.get_base_model(), "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)


def export_merged(model: PeftModel, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a whole bf16 model with the update folded in, `deq(Wq) + s (B A - B0 A0)` (what training saw),
    loadable without PEFT. The folder appears complete or not at all."""
    return write_folder(model, out_dir, lambda tmp: write_merged(model, tmp), tokenizer)
