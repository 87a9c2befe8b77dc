"""The frozen correction under an enclosing bf16 autocast (TRL's `SFTConfig` defaults to `bf16=True`): the learned
update `s (B A - B0 A0)` must not be rounded to bf16 before it cancels, or a learned `B - B0` below bf16's
resolution of B turns into noise. Every reference is fp64 math on the layer's weights. And TRL's bf16 cast of a 4-bit
model's adapters, undone for every init."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, rel, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn

from qloraga import QLoraGAConfig, get_qloraga_model, load_model, restore_adapter_dtype
from qloraga.adapters import (
    ADAPTER,
    ResidualCorrection,
    attach_correction,
    corrected_layers,
    delta_weight,
    get_lora_model,
    wired_layers,
)

BF16_AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def learned_delta(layer, x: torch.Tensor) -> torch.Tensor:
    """fp64 `s (B A - B0 A0) x`, from the layer's weights."""
    a, b = layer.lora_A[ADAPTER].weight.double(), layer.lora_B[ADAPTER].weight.double()
    update = b @ a - layer.qloraga_B0.double() @ layer.qloraga_A0.double()
    return layer.scaling[ADAPTER] * x.double() @ update.T


def corrected_linear(dropout: float, noise: float = 1e-4) -> nn.Module:
    """One LoRA-GA layer on a zero base weight (its output is the adapter term alone), fp32 adapters started at
    A0, B0 of LoRA-GA's size (entries ~0.07) and then moved by `noise`: a few Adam steps at LoRA-GA's rate."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    nn.init.zeros_(model[0].weight)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = peft_model.get_base_model()[0]
    attach_correction(layer, 0.09 * torch.randn(4, 64, generator=g), 0.09 * torch.randn(48, 4, generator=g),
                      torch.float32)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.add_(noise * torch.randn(48, 4, generator=g))
        layer.lora_A[ADAPTER].weight.add_(noise * torch.randn(4, 64, generator=g))
    return peft_model.eval()


@pytest.mark.unit
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # one [A; A0] matmul, or dropout's two (identity in eval mode)
def test_the_correction_forward_under_bf16_autocast(dropout):
    model = corrected_linear(dropout)
    layer = model.get_base_model()[0]
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast(**BF16_AUTOCAST):
        out = model(x)
    # The layer's bf16 output rounds the learned term once (measured 1.7e-3); rounding A, B, A0, B0 to bf16 before
    # they cancel gave 1.8.
    assert rel(out, learned_delta(layer, x)) < 1e-2


@pytest.mark.unit
def test_delta_weight_under_bf16_autocast():
    """The merged export's and PEFT merge's update `s (B A - B0 A0)` (export/merged.py reads `delta_weight`)."""
    layer = corrected_linear(0.0).get_base_model()[0]
    a, b = layer.lora_A[ADAPTER].weight.double(), layer.lora_B[ADAPTER].weight.double()
    expected = layer.scaling[ADAPTER] * (b @ a - layer.qloraga_B0.double() @ layer.qloraga_A0.double())
    with torch.autocast(**BF16_AUTOCAST):
        got = delta_weight(layer)
    assert rel(got, expected) < 1e-3  # fp32 products: 3.6e-5; in bf16 under the autocast 1.9
    assert got.dtype == torch.float32


def sft_data():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}
                              for a in range(8) for b in range(4)])


class InputsSeen:
    """Forward pre-hooks on the corrected layers: the last input each saw in training and whether an autocast
    was on around it."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.autocast: set[bool] = set()
        self.handles = [layer.register_forward_pre_hook(self.hook(name)) for name, layer in layers.items()]

    def hook(self, name):
        def record(module, args):
            if module.training:
                self.inputs[name] = args[0].detach().clone()
                self.autocast.add(torch.is_autocast_enabled(args[0].device.type))
        return record

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_sft_trainer_at_its_default_bf16_learns_the_update_it_computes(tiny_model_dir, tmp_path):
    """The README's TRL recipe: SFTConfig's own bf16 default (autocast on), LoRA-GA's rate, a few steps; then every
    corrected layer, under the trainer's own autocast, computes the update its weights hold (fp64 reference)."""
    trl = pytest.importorskip("trl")
    path = tiny_model_dir("llama")
    model = get_qloraga_model(load_model(path), QLoraGAConfig(r=4, adapter_dtype="float32", progress=False),
                              make_batches())
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), learning_rate=2e-5,  # the README's, bf16 its default
                         max_steps=3, per_device_train_batch_size=4, max_length=32, report_to="none",
                         save_strategy="no", use_cpu=True)
    assert args.bf16  # what the README's recipe relies on
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tiny_tokenizer())
    restore_adapter_dtype(trainer.model)
    layers = corrected_layers(model)
    seen = InputsSeen(layers)
    try:
        trainer.train()
    finally:
        seen.remove()
    assert seen.autocast == {True} and seen.inputs.keys() == layers.keys()  # TRL trained under autocast
    for name, layer in layers.items():
        b = layer.lora_B[ADAPTER].weight
        moved = rel(b, layer.qloraga_B0)
        assert 0 < moved < 2**-8, name  # trained, by less than bf16's resolution of B (measured 3e-4 to 5e-4)
        x = seen.inputs[name]
        result = torch.zeros(*x.shape[:-1], layer.out_features)
        with torch.no_grad(), trainer.accelerator.autocast():
            delta = ResidualCorrection.forward(layer, ADAPTER, x, result)
        # 0.8e-4 to 1.5e-4 (fp32 products that cancel); 2.3 on the first layer in bf16 under the autocast
        assert rel(delta, learned_delta(layer, x)) < 1e-2, name


@pytest.mark.parametrize("init", ["lora-one", "gora", "lora"])
def test_sft_trainer_keeps_fp32_adapters_without_the_correction(tiny_model_dir, tmp_path, init):
    """TRL casts a 4-bit model's trainable weights to bf16; restore_adapter_dtype undoes it for every init, not only
    the corrected layers of LoRA-GA (before: LoRA-One's, GoRA's and plain LoRA's adapters trained in bf16)."""
    trl = pytest.importorskip("trl")
    config = QLoraGAConfig(r=4, adapter_dtype="float32", progress=False, method="lora-one" if init == "lora" else init)
    base = load_model(tiny_model_dir("llama"))
    model = get_lora_model(base, config) if init == "lora" else get_qloraga_model(base, config, make_batches())
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, max_length=32, report_to="none", use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tiny_tokenizer())
    assert restore_adapter_dtype(trainer.model) == len(wired_layers(model)) == 14  # 7 projections x 2 blocks
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(trainable) == 28 and {p.dtype for p in trainable} == {torch.float32}
