"""Two processes (gloo, CPU): identical adapters on both ranks, equal to one process over all the batches;
DDP training steps equal one process on the combined batch; the command line under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_batches, write_dataset
from safetensors.torch import load_file, save_file

from qloraga import QLoraGAConfig, get_qloraga_model, load_model
from qloraga.adapters import corrected_layers
from qloraga.init.pipeline import initial_factors
from qloraga.targets import find_target_layers

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    port = free_port()
    mp.spawn(fn, args=(port, *args), nprocs=WORLD, join=True)


def setup(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))  # a hang fails the test instead of CI


def init_worker(rank, port, model_dir, out, estimator):
    setup(rank, port)
    model = load_model(model_dir)
    factors, _ = initial_factors(model, find_target_layers(model), make_batches(n_batches=4),
                              QLoraGAConfig(r=4, progress=False, estimator=estimator))
    save_file({f"{n}.{i}": t for n, ab in factors.items() for i, t in enumerate(ab)}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_init_is_identical_on_every_rank_and_equals_one_process(tiny_model_dir, tmp_path, estimator):
    model_dir = tiny_model_dir("llama")
    spawn(init_worker, model_dir, str(tmp_path), estimator)
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # bit-identical across ranks
    model = load_model(model_dir)
    single, _ = initial_factors(model, find_target_layers(model), make_batches(n_batches=4),
                             QLoraGAConfig(r=4, progress=False, estimator=estimator))
    # The only difference is the order of the fp32 sums over batches (~1e-7 relative in G); singular
    # vectors move by that over the singular-value gaps (their signs are fixed by lora_ga_factors), so
    # 1e-3 is ample and still fails on a wrong reduction.
    for name, (a, b) in single.items():
        torch.testing.assert_close(r0[f"{name}.0"], a, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(r0[f"{name}.1"], b, rtol=1e-3, atol=1e-4)


def uniform_batches(n: int):
    """Batches with no padding, so every rank's mean loss covers the same number of tokens."""
    return make_batches(n_batches=n, batch_size=1, seq_len=10, pad_last=0)


def ddp_worker(rank, port, model_dir, out):
    setup(rank, port)
    batches = uniform_batches(4)
    model = get_qloraga_model(load_model(model_dir, dtype=torch.float32),
                              QLoraGAConfig(r=4, adapter_dtype="float32", progress=False), batches)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):  # rank k takes sample 2*step + k of each combined batch of two
        batch = batches[(2 * step + rank) % 4]
        ddp(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  f"{out}/ddp.safetensors")
    dist.destroy_process_group()
    # torch 2.13: freeing DDP's reducer holds the GIL while it joins gloo's worker thread, and that thread
    # needs the GIL to free the last all-reduce (its thread-local state holds the context backward stashes),
    # so returning here deadlocks most of the time. The outputs are written: leave without destructors.
    os._exit(0)


def test_ddp_steps_equal_one_process_on_the_combined_batch(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    spawn(ddp_worker, model_dir, str(tmp_path))
    batches = uniform_batches(4)
    model = get_qloraga_model(load_model(model_dir, dtype=torch.float32),
                              QLoraGAConfig(r=4, adapter_dtype="float32", progress=False), batches)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        combined = {k: torch.cat([batches[(2 * step) % 4][k], batches[(2 * step + 1) % 4][k]]) for k in batches[0]}
        model(**combined).loss.backward()
        opt.step()
        opt.zero_grad()
    ddp = load_file(tmp_path / "ddp.safetensors")
    moved = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            # fp32 compute and adapters; only summation orders differ (DDP averages two half-batch means)
            torch.testing.assert_close(ddp[name], p.detach(), rtol=1e-4, atol=1e-5)
            moved += (p.detach() - corrected_init(model, name)).abs().sum().item()
    assert moved > 0  # the steps really moved the adapters


def corrected_init(model, param_name: str) -> torch.Tensor:
    """The initial value of an adapter weight (A0 or B0), kept as the frozen correction."""
    module_name, kind = param_name.rsplit(".lora_", 1)
    layer = corrected_layers(model)[module_name]
    return (layer.qloraga_A0 if kind.startswith("A") else layer.qloraga_B0).float()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_cli_under_torchrun_writes_one_adapter(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "train.jsonl", "prompt-completion", n=32)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "finetune.py"), "--model", tiny_model_dir("llama"), "--dataset", data,
           "--output-dir", str(out), "--4bit", "--rank", "4", "--batch-size", "2", "--grad-accum", "1", "--seq-len",
           "64", "--lr", "1e-3", "--max-steps", "3", "--ga-batches", "4", "--logging-steps", "1", "--eval-samples", "2",
           "--no-gradient-checkpointing", "--init", "lora-ga"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count("LoRA-GA init:") == 1  # only rank 0 talks
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3]  # one writer, not two


def test_bf16_quant_storage_for_fsdp_works_the_same(tiny_model_dir):
    """FSDP needs the 4-bit weights stored as bf16 (configs/accelerate/fsdp_qlora.yaml): same model, same init."""
    from conftest import logits, rel

    path, batches = tiny_model_dir("llama"), make_batches()
    plain, packed = load_model(path), load_model(path, quant_storage=torch.bfloat16)
    assert packed.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # stored as bf16, still NF4
    base = logits(plain, batches)
    a = get_qloraga_model(plain, QLoraGAConfig(r=4, progress=False), batches)
    b = get_qloraga_model(packed, QLoraGAConfig(r=4, progress=False), batches)
    assert rel(logits(b, batches), base) < 1e-5
    for name, layer in corrected_layers(a).items():
        torch.testing.assert_close(corrected_layers(b)[name].qloraga_B0, layer.qloraga_B0, rtol=0, atol=0)
