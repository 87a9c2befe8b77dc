"""Working with other trainers. TRL's `SFTTrainer` casts the trainable adapter weights of a 4-bit model to
bf16 when it is built (QLoRA's habit); a qloraga model with fp32 adapters (the presets' choice: Adam steps at
a full-fine-tuning learning rate vanish in bf16) then no longer cancels its fp32 correction at step 0 (LoRA-GA),
and every init's Adam steps below bf16's resolution of the weights are lost (LoRA-One, GoRA, plain LoRA)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qloraga.adapters import ADAPTER, DTYPE_ATTR, start_values, wired_layers


def restore_adapter_dtype(model: nn.Module) -> int:
    """Give every qloraga adapter's trainable `A`, `B` the dtype qloraga wired them in (`adapter_dtype`) again, any
    init; a corrected layer's get their exact step-0 values back where a cast only rounded them (a layer without the
    correction keeps the cast's rounding of its start: nothing cancels it). Returns how many layers changed. Call it
    after building the trainer and before `train()` (the optimizer is made then):

        trainer = SFTTrainer(model=peft_model, ...)
        qloraga.restore_adapter_dtype(trainer.model)
        trainer.train()
    """
    changed, lossy = 0, 0
    for layer in wired_layers(model).values():
        dtype = getattr(layer, DTYPE_ATTR)
        weights = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        if all(weight.dtype == dtype for weight in weights):
            continue
        for weight, start in zip(weights, start_values(layer) or (None, None), strict=True):
            if start is not None and torch.equal(weight.data, start.to(weight.dtype)):  # untrained: rounded A0, B0
                weight.data = start.detach().clone()
            else:
                weight.data = weight.data.to(dtype)
                lossy += start is not None
        changed += 1
    if lossy:
        warnings.warn(f"{lossy} adapter weights had moved since step 0 and were rounded by a cast: restored in "
                      "their dtype, not their values. Call restore_adapter_dtype before training.", stacklevel=2)
    return changed
