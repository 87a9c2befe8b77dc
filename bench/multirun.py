"""Several LoRA runs of one method on one 4-bit base, trained as one model (the GPU study's batching).

On a GPU, a training step of a 135M model is thousands of kernels that each fill a sliver of the chip, so
runs side by side in processes wait on each other's launches. K runs of one method on the same frozen base
(other learning rates, other seeds) do K times the work in the same kernels when they are one model: each
target layer keeps the shared base layer and K adapters, a step's batch is the K runs' batches one after the
other, and run k's rows go through adapter k only (one batched matmul). Each run keeps its own optimizer group
(its learning rate and schedule), its own gradient clipping and its own batches, so it computes what its own
model computes: tests/test_multirun.py checks the losses against K separate runs of `real_convergence.train_run`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import common
import convergence
import real_convergence as rc
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from qloraga.adapters import A0_BUFFER, B0_BUFFER

ADAPTER = "default"


class SlotLinear(nn.Module):
    """One target layer of K runs: the shared base layer, and run k's adapter on the k-th K-th of the rows:
    `s B A x`, or with the frozen buffers `s [B, -B0] [A x; A0 x]` (as `ResidualCorrection` computes: LoRA-GA's
    correction and/or the quantization-error fit).
    With `only = k` every row goes through run k's adapter: run k's own model, for its evaluation."""

    def __init__(self, base: nn.Module, layers: Sequence[LoraLayer]):
        super().__init__()
        self.base = base
        # Runs whose ranks differ here (a gradient rank allocation, per seed) are zero-padded to the widest: the
        # padded rows of A and columns of B get zero gradients, so they stay zero and change nothing.
        rank = max(x.lora_A[ADAPTER].weight.shape[0] for x in layers)

        def rows(t: torch.Tensor, n: int = rank) -> torch.Tensor:  # (r, in) -> (n, in)
            return F.pad(t.detach().clone(), (0, 0, 0, n - t.shape[0]))

        def cols(t: torch.Tensor, n: int = rank) -> torch.Tensor:  # (out, r) -> (out, n)
            return F.pad(t.detach().clone(), (0, n - t.shape[1]))

        self.a = nn.ParameterList([nn.Parameter(rows(x.lora_A[ADAPTER].weight)) for x in layers])
        self.b = nn.ParameterList([nn.Parameter(cols(x.lora_B[ADAPTER].weight)) for x in layers])
        self.scaling = layers[0].scaling[ADAPTER]
        self.corrected = getattr(layers[0], A0_BUFFER, None) is not None
        if self.corrected:  # its own width: the quantization-error fit's rows may stand beside the correction's
            frozen = max(getattr(x, A0_BUFFER).shape[0] for x in layers)
            self.register_buffer("a0", torch.stack([rows(getattr(x, A0_BUFFER), frozen) for x in layers]))
            self.register_buffer("b0", torch.stack([cols(getattr(x, B0_BUFFER), frozen) for x in layers]))
        self.only: int | None = None

    def factors(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of run k, or of every run stacked ((K, r, in), (K, out, r)); with the correction, rank 2r."""
        if k is None:
            a, b = torch.stack(list(self.a)), torch.stack(list(self.b))
            a0, b0 = (self.a0, self.b0) if self.corrected else (None, None)
        else:
            a, b = self.a[k], self.b[k]
            a0, b0 = (self.a0[k], self.b0[k]) if self.corrected else (None, None)
        if a0 is None:
            return a, b
        return torch.cat([a, a0], dim=-2), torch.cat([b, -b0], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.a[0].dtype)
        if self.only is not None:
            a, b = self.factors(self.only)
            delta = F.linear(F.linear(x, a), b)
        else:
            a, b = self.factors()
            rows = x.reshape(len(self.a), -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        return result + (delta * self.scaling).to(result.dtype)


def group_model(models: Sequence[nn.Module]) -> tuple[nn.Module, list[list[nn.Parameter]]]:
    """One model of the K runs `models` (single-run PEFT models of one method on one base; the same object may
    stand for several runs that start alike): the first one's modules, each target layer a `SlotLinear`.
    Returns it and each run's trainable parameters."""
    shell = models[0]
    slots = []
    for name in [n for n, m in shell.named_modules() if isinstance(m, LoraLayer)]:
        layers = [m.get_submodule(name) for m in models]
        slot = SlotLinear(layers[0].base_layer, layers)
        parent, child = name.rsplit(".", 1)
        setattr(shell.get_submodule(parent), child, slot)
        slots.append(slot)
    params = [[p for s in slots for p in (s.a[k], s.b[k])] for k in range(len(models))]
    return shell, params


@contextlib.contextmanager
def only(model: nn.Module, k: int) -> Iterator[None]:
    """Within: `model` computes run k's model on every row."""
    slots = [m for m in model.modules() if isinstance(m, SlotLinear)]
    for s in slots:
        s.only = k
    try:
        yield
    finally:
        for s in slots:
            s.only = None


def joined(batches: Sequence[dict], pad_id: int) -> dict:
    """The K runs' batches as one, each right-padded to the widest (padding after a row changes none of it)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=v) for b in batches])
            for key, v in fill.items()}


def run_losses(model: nn.Module, batch: dict, k: int) -> torch.Tensor:
    """Each run's mean loss per completion token over its own rows (what the model's loss is for one run). The
    head is applied to the positions that predict a label only: 18 runs' logits over every position of a batch
    would be gigabytes (49152 words), for a few completion tokens per row."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    losses = F.cross_entropy(lm.lm_head(hidden[:, :-1][mask]).float(), labels[mask], reduction="none")
    run = mask.nonzero()[:, 0] // (mask.shape[0] // k)  # row i belongs to run i // rows per run
    total = torch.zeros(k, device=losses.device, dtype=losses.dtype).index_add_(0, run, losses)
    return total / mask.view(k, -1).sum(1)


def group_step(model: nn.Module, params: list[list[nn.Parameter]], optimizer: torch.optim.Optimizer,
               batches: Sequence[dict], pad_id: int) -> list[float]:
    """One step of every run on its own batch: forward once, each run's mean loss, clip each run's gradient to
    norm 1 (as `common.train_step` does for one run), one optimizer step. Returns the K losses."""
    model.train()
    losses = run_losses(model, common.to_device(joined(batches, pad_id), common.device_of(model)), len(batches))
    losses.sum().backward()  # run i's parameters get the gradient of run i's loss only
    for p in params:
        torch.nn.utils.clip_grad_norm_(p, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.tolist()


def optimizer_of(params: list[list[nn.Parameter]], lrs: Sequence[float]) -> torch.optim.Optimizer:
    """`common.make_optimizer`'s AdamW (no weight decay) with one group, and learning rate, per run."""
    return torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in zip(params, lrs, strict=True)], weight_decay=0.0)


def train_group(model: nn.Module, params: list[list[nn.Parameter]], orders: list[list[dict]], lrs: list[float],
                task, eval_every: int | Sequence[int], eval_batch: int = 32) -> list[dict[str, list]]:
    """`convergence.train_curve` for K runs at once: each its own AdamW group, warmup + cosine from its own rate,
    clipping to norm 1; each run's test loss and accuracy at step 0, as `eval_every` says and at the end."""
    k, steps = len(orders), len(orders[0])
    optimizer = optimizer_of(params, lrs)
    curves: list[dict[str, list]] = [{"step": [], "test_loss": [], "test_acc": [], "train_loss": []}
                                     for _ in range(k)]
    due = convergence.evaluated(eval_every)

    def record(step: int) -> None:
        for i, curve in enumerate(curves):
            with only(model, i):
                loss, acc = convergence.evaluate(model, task.test, task.pad_id, batch_size=eval_batch)
            curve["step"].append(step)
            curve["test_loss"].append(loss)
            curve["test_acc"].append(acc)

    record(0)
    for step in range(1, steps + 1):
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = convergence.lr_at(step, steps, lr)
        values = group_step(model, params, optimizer, [o[step - 1] for o in orders], task.pad_id)
        for curve, value in zip(curves, values, strict=True):
            curve["train_loss"].append(value)
        if due(step) or step == steps:
            record(step)
    return curves


# inits whose runs share the frozen 4-bit base unchanged (the quantization-error fit is a frozen buffer beside it)
GROUPABLE = {"lora", "lora-ga", "lora-one", "lora-one-ranks", "gora", "lora-one-qe"}


@dataclass
class Group:
    """K runs of one method as one model, with each run's batches (`orders`: as many steps as built for)."""

    method: str
    slots: list[tuple[float, int]]  # (learning rate, seed) of each run
    model: nn.Module
    params: list[list[nn.Parameter]]
    orders: list[list[dict]]
    init_s: float


def build_group(task, method: str, slots: Sequence[tuple[float, int]], args, base_path: str) -> Group:
    """The runs (learning rate, seed) of `method` as one model: each run's init on its seed's gradient batches
    (`real_convergence.build`, once per seed), its batches for `args.steps` steps."""
    bits, init, optim = rc.METHODS[method]
    if bits != 4 or init not in GROUPABLE or optim != "adamw":
        raise ValueError(f"{method} cannot be grouped: only AdamW LoRA methods on the 4-bit base share it")
    start = time.perf_counter()
    seeds = sorted({seed for _, seed in slots})
    data = {seed: rc.run_batches(task, seed, args) for seed in seeds}
    built = {seed: rc.build(method, base_path, data[seed][0], args.r, seed)[0] for seed in seeds}
    model, params = group_model([built[seed] for _, seed in slots])
    return Group(method, list(slots), model, params, [data[seed][1] for _, seed in slots],
                 time.perf_counter() - start)


def train_built(group: Group, task, steps: int, eval_every: int | Sequence[int]) -> list[dict]:
    """Train a built group for its first `steps` batches: what `real_convergence.train_run` returns for each run
    (a run's batches for fewer steps are the first ones of its batches for more: the same random stream)."""
    start = time.perf_counter()
    curves = train_group(group.model, group.params, [o[:steps] for o in group.orders], [lr for lr, _ in group.slots],
                         task, eval_every)
    val = []
    for i in range(len(group.slots)):
        with only(group.model, i):
            val.append(convergence.evaluate(group.model, task.val, task.pad_id, batch_size=32)[0])
    seconds = time.perf_counter() - start
    print(f"{task.name}: {group.method}, {len(group.slots)} runs as one model, {steps} steps: {seconds:.0f}s",
          flush=True)
    return [{"method": group.method, "lr": lr, "seed": seed, "load_init_s": group.init_s, "val_loss": v,
             "train_eval_s": seconds, "runs_in_model": len(group.slots), **curve}
            for (lr, seed), v, curve in zip(group.slots, val, curves, strict=True)]


def calibrate(group: Group, task, steps: int = 5) -> dict[str, float]:
    """Seconds of one step of the whole group (after one warm-up step) and of one run's held-out evaluation;
    the parameters are put back as they were, and the optimizer used is thrown away."""
    saved = [p.detach().clone() for ps in group.params for p in ps]
    optimizer = optimizer_of(group.params, [lr for lr, _ in group.slots])
    batches = [[o[i % len(o)] for o in group.orders] for i in range(steps + 1)]
    group_step(group.model, group.params, optimizer, batches[0], task.pad_id)
    step_s = common.timed(lambda: [group_step(group.model, group.params, optimizer, b, task.pad_id)
                                   for b in batches[1:]]) / steps
    with only(group.model, 0):
        eval_s = common.timed(lambda: convergence.evaluate(group.model, task.test, task.pad_id, batch_size=32))
    with torch.no_grad():
        for p, value in zip([p for ps in group.params for p in ps], saved, strict=True):
            p.copy_(value)
    return {"step_s": step_s, "eval_s": eval_s}


def group_runs(task, method: str, slots: Sequence[tuple[float, int]], args, base_path: str) -> list[dict]:
    """Build and train: the runs of `method` at (learning rate, seed) `slots` for `args.steps` steps."""
    return train_built(build_group(task, method, slots, args, base_path), task, args.steps, args.eval_every)
