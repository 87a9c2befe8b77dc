"""Independent references: an fp32 model whose weights are the dequantized NF4 weights, and its autograd."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qloraga.loading import dequantized_weight


def dequantized_fp32_copy(model: nn.Module) -> nn.Module:
    """A plain fp32 transformers model computing with the weights `model` really uses."""
    ref = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    source = dict(model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name not in source:
                continue
            src = source[name]
            if isinstance(module, nn.Linear):
                module.weight.copy_(dequantized_weight(src).float())
                if module.bias is not None:
                    module.bias.copy_(src.bias.float())
            else:
                for pname, param in module.named_parameters(recurse=False):
                    param.copy_(getattr(src, pname).float())
    return ref.eval()


def autograd_grads(ref: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean over batches of dL/dW for the named linear layers, by plain autograd."""
    modules = dict(ref.named_modules())
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    for batch in batches:
        ref(**batch, use_cache=False).loss.backward()
    return {n: modules[n].weight.grad / len(batches) for n in names}
