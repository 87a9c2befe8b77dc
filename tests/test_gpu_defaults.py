"""The GPU defaults together, as far as a CPU runs them: the Trainer's gradient checkpointing on the 4-bit base, the
optimizer `optim: auto` gives a GPU (bitsandbytes' paged 8-bit AdamW; on a CPU bitsandbytes runs it unpaged), and
`--resume` from a checkpoint that holds its 8-bit state, against an uninterrupted run."""

from __future__ import annotations

import functools
import json

import bitsandbytes as bnb
import pytest
import torch
from conftest import run_cli, run_cli_interrupted, save_tiny, write_dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

import qloraga.training as training
from qloraga.config import resolve_optim

# Wide enough that r=16 adapters have >= 4096 entries, below which bitsandbytes keeps 32-bit state (min_8bit_size);
# k_proj's and v_proj's B (128 x 16) stay below it, so the checkpoint holds both kinds.
WIDE = dict(hidden_size=256, intermediate_size=512)
# The GPU defaults on the command line: run_cli's --no-gradient-checkpointing and fp32 compute undone, no --optim.
GPU_DEFAULTS = ("--4bit", "--dtype", "bfloat16", "--gradient-checkpointing", "--rank", "16", "--max-steps", "6")


class Observed(TrainerCallback):
    """What a run's Trainer trained with: `optim`, its optimizer's class, and how often the first decoder block's
    attention was called in each optimizer step: twice with checkpointing, the forward and its recomputation in the
    backward (transformers checkpoints the block's `forward`, so hooks on the block itself run once; the recomputation
    stops early once it has what the backward needs, so a submodule's forward hook may not run: a pre-hook does)."""

    def __init__(self, runs: list[dict]):
        self.run = {"calls": []}
        self.stepping = False
        runs.append(self.run)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
        self.run.update(optim=args.optim, optimizer=type(optimizer), bits=optimizer.args.optim_bits,
                        paged=optimizer.is_paged)
        model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(self.count)

    def count(self, module, args):
        if self.stepping:
            self.run["calls"][-1] += 1

    def on_step_begin(self, args, state, control, **kwargs):
        self.run["calls"].append(0)
        self.stepping = True

    def on_step_end(self, args, state, control, **kwargs):
        self.stepping = False


def observing(runs: list[dict], real=training.build_trainer):
    """The recipe's `build_trainer`, each trainer observed into `runs`."""

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(Observed(runs))
        return trainer

    return build


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow  # an interrupted run and its resume, as test_cli::test_resume_after_interruption
def test_gpu_defaults_train_and_resume_exactly(tmp_path, monkeypatch):
    model = save_tiny("llama", tmp_path / "model", **WIDE)
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion")
    # `optim: auto` resolved as on a CUDA machine; everything else runs on this CPU.
    monkeypatch.setattr(training, "resolve_optim", functools.partial(resolve_optim, cuda=True))
    runs: list[dict] = []
    build = observing(runs)
    monkeypatch.setattr(training, "build_trainer", build)  # run_cli_interrupted wraps it in turn
    monkeypatch.setattr("qloraga.recipe.build_trainer", build)
    assert run_cli(model, data, tmp_path / "straight", *GPU_DEFAULTS) == 0
    assert run_cli_interrupted(monkeypatch, model, data, tmp_path / "resumed", *GPU_DEFAULTS) == 130
    # The checkpoint to resume from holds the optimizer's 8-bit moments (uint8 beside fp32 absmax and code maps).
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    kinds = {t.dtype for s in saved["state"].values() for t in s["__bnb_optimizer_quant_state__"].values()}
    assert torch.uint8 in kinds
    assert run_cli(model, data, tmp_path / "resumed", *GPU_DEFAULTS, "--resume") == 0

    assert len(runs) == 3
    for run in runs:
        assert run["optim"] == "paged_adamw_8bit"
        assert issubclass(run["optimizer"], bnb.optim.AdamW) and run["bits"] == 8 and run["paged"], run
        assert run["calls"] and set(run["calls"]) == {2}, run["calls"]  # checkpointed: forward + recomputation
    assert len(runs[2]["calls"]) == 4  # the resumed run trained steps 3-6 only

    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert sorted(losses(tmp_path / "straight")) == [1, 2, 3, 4, 5, 6]
