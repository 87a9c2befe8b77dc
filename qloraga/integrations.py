"""Working with other trainers. TRL's `SFTTrainer` casts the trainable adapter weights of a 4-bit model to
bf16 when it is built (QLoRA's habit); a qloraga model with fp32 adapters (the presets' choice: Adam steps at
a full-fine-tuning learning rate vanish in bf16) then no longer cancels its fp32 correction at step 0."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qloraga.adapters import ADAPTER, corrected_layers


def restore_adapter_dtype(model: nn.Module) -> int:
    """Give every corrected layer's trainable `A`, `B` the dtype of its frozen correction `A0`, `B0` again, and
    their step-0 values where a cast only rounded those; returns how many layers changed. Call it after building
    the trainer and before `train()` (the optimizer is made then):

        trainer = SFTTrainer(model=peft_model, ...)
        qloraga.restore_adapter_dtype(trainer.model)
        trainer.train()
    """
    changed, lossy = 0, 0
    for layer in corrected_layers(model).values():
        pairs = [(layer.lora_A[ADAPTER].weight, layer.qloraga_A0), (layer.lora_B[ADAPTER].weight, layer.qloraga_B0)]
        if all(weight.dtype == start.dtype for weight, start in pairs):
            continue
        for weight, start in pairs:
            if torch.equal(weight.data, start.to(weight.dtype)):  # untrained: the rounded step-0 values
                weight.data = start.detach().clone()
            else:
                weight.data = weight.data.to(start.dtype)
                lossy += 1
        changed += 1
    if lossy:
        warnings.warn(f"{lossy} adapter weights had moved since step 0 and were rounded by a cast: restored in "
                      "their dtype, not their values. Call restore_adapter_dtype before training.", stacklevel=2)
    return changed
