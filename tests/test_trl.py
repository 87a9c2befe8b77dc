"""A qloraga model trains under TRL's SFTTrainer, and what it exports is what it trained."""

from __future__ import annotations

import pytest
from conftest import logits, make_batches, rel, tiny_tokenizer
from peft import PeftModel

from qloraga import QLoraGAConfig, export_adapter, get_qloraga_model, load_model, restore_adapter_dtype
from qloraga.adapters import ADAPTER, corrected_layers

trl = pytest.importorskip("trl")


def test_sft_trainer_trains_a_qloraga_model(tiny_model_dir, tmp_path):
    from datasets import Dataset

    path = tiny_model_dir("llama")
    batches = make_batches()
    base = logits(load_model(path), batches)
    model = get_qloraga_model(load_model(path), QLoraGAConfig(r=4, adapter_dtype="float32", progress=False), batches)
    data = Dataset.from_list([{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}
                              for a in range(8) for b in range(4)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                         max_length=32, bf16=False, gradient_checkpointing=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
    # TRL casts a 4-bit model's adapters to bf16; the fp32 correction needs them back in fp32.
    assert restore_adapter_dtype(trainer.model) == len(corrected_layers(model))
    layer = next(iter(corrected_layers(model).values()))
    assert layer.lora_A[ADAPTER].weight.dtype == layer.qloraga_A0.dtype
    assert rel(logits(model, batches), base) < 1e-5  # still exactly the base at step 0
    losses = [log["loss"] for log in trainer.train() and trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and losses[-1] < losses[0]
    trained = logits(model, batches)
    out = export_adapter(model, tmp_path / "adapter")
    assert rel(logits(PeftModel.from_pretrained(load_model(path), out), batches), trained) < 1e-5
