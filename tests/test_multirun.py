"""bench/multirun.py (the GPU study's batching): K runs of one method trained as one model give each run what its
own model gives: the held-out, training and validation losses of `real_convergence.train_run` (PEFT's LoRA
layers or qloraga's correction, transformers' loss, one optimizer per run), step by step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import multirun
import real_convergence as rc


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    base = rc.tiny_base()
    task = rc.load_task("debian", AutoTokenizer.from_pretrained(base))
    task.train, task.val, task.test = task.train[:40], task.val[:4], task.test[:6]
    args = argparse.Namespace(batch_size=3, grad_batches=1, steps=4, eval_every=[2], r=2)
    return task, args, base


# Two rates at seed 0 (same init, same batches) and one at seed 1 (its own init and batches).
SLOTS = [(1e-2, 0), (1e-1, 0), (1e-2, 1)]


# Plain adapters (QLoRA; LoRA-One computes the same way), adapters with the frozen correction (LoRA-GA), and
# per-layer ranks that differ between the seeds (GoRA's allocation: zero-padded to the widest).
@pytest.mark.parametrize("method", ["QLoRA (PEFT, B=0)", "LoRA-GA (qloraga, exact)", "GoRA (qloraga)",
                                    "LoRA-One + quant-error fit (qloraga)"])
def test_runs_as_one_model_match_separate_runs(setup, method):
    task, args, base = setup
    torch.manual_seed(0)
    grouped = multirun.group_runs(task, method, SLOTS, args, base)
    separate = [rc.train_run(task, method, lr, seed, args, base) for lr, seed in SLOTS]
    for g, s in zip(grouped, separate, strict=True):
        assert (g["lr"], g["seed"]) == (s["lr"], s["seed"])
        assert g["step"] == s["step"] == [0, 2, 4]
        for key in ("test_loss", "train_loss", "test_acc"):
            assert g[key] == pytest.approx(s[key], rel=1e-6), key
        assert g["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)
    finals = [s["test_loss"][-1] for s in separate]  # the runs differ by 5x the tolerance: it can fail
    assert min(abs(a - b) for i, a in enumerate(finals) for b in finals[i + 1:]) > 5e-6 * finals[0]
    if method.startswith("LoRA-GA"):  # step 0 is the base: every run starts at the same loss
        assert [g["test_loss"][0] for g in grouped] == pytest.approx([grouped[0]["test_loss"][0]] * 3, rel=1e-6)


def test_full_fine_tuning_is_not_grouped(setup):
    task, args, base = setup
    with pytest.raises(ValueError, match="cannot be grouped"):
        multirun.group_runs(task, "full fine-tuning (bf16 base)", SLOTS, args, base)
