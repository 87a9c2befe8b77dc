"""Estimate the full fine-tuning gradient dL/dW of target layers, chunk by chunk, from hooks.

For a linear layer `y = W x`, `dL/dW = sum_t delta_t x_t^T` with `delta = dL/dy`. A forward hook keeps
the layer's input and hangs a hook on its output that receives `delta`, so no weight needs
`requires_grad` and a 4-bit weight is never re-quantized: G is the gradient of the function the
quantized model computes. Only one chunk of decoder blocks (planned by `chunks.py`) accumulates (fp32)
at a time, and the backward pass stops at the chunk's first target layer (its input is made a leaf).
With checkpointing, each decoder block recomputes its activations in the backward pass instead of
keeping them, as gradient checkpointing does in training: the pass then holds one block's activations
at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from tqdm.auto import tqdm

from qloraga.errors import DataError, TrainingDiverged
from qloraga.loading import model_device
from qloraga.targets import block_index, decoder_blocks


@contextmanager
def gradient_pass(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off), no parameter gradients, autograd on; restores the model afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class Rerun:
    """Whether a checkpointed block is re-running its forward in the backward pass (to rebuild activations)."""

    active = False


@contextmanager
def checkpointed_blocks(model: nn.Module, rerun: Rerun) -> Iterator[None]:
    """Run every decoder block under non-reentrant activation checkpointing, with `rerun.active` set while a
    block re-runs its forward; restores the blocks afterwards.

    Our own wrapper rather than transformers' `gradient_checkpointing_enable`, which only acts in training
    mode (dropout on) and not on every model class.
    """
    _, blocks = decoder_blocks(model)
    saved = [block.__dict__.get("forward") for block in blocks]  # an instance-level forward (e.g. a hook)
    for block in blocks:
        block.forward = _checkpointed(block.forward, rerun)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            del block.forward
            if forward is not None:
                block.forward = forward


def _checkpointed(forward: Callable, rerun: Rerun) -> Callable:
    def run(*args, **kwargs):
        calls = 0

        def once_then_flagged(*a, **k):
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*a, **k)
            rerun.active = True
            try:
                return forward(*a, **k)
            finally:
                rerun.active = False

        with set_checkpoint_early_stop(False):  # re-run the whole block: every target layer sees its input
            return checkpoint(once_then_flagged, *args, use_reentrant=False, **kwargs)

    return run


PairHook = Callable[[str, torch.Tensor, torch.Tensor], None]


class Pairs:
    """Brings each target layer's input `x` and output gradient `delta` together, in whichever order they come.

    Without checkpointing, `x` comes in the forward pass and waits for `delta`. With it, `x` is taken when
    the block re-runs in the backward pass, so only the block being back-propagated holds its layers'
    inputs; a `delta` may then come first (e.g. `down_proj`'s, whose gradient needs no saved tensor).
    """

    def __init__(self, on_pair: PairHook) -> None:
        self.on_pair = on_pair
        self.x: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}

    def add_x(self, name: str, x: torch.Tensor) -> None:
        if name in self.delta:
            self.emit(name, x, self.delta.pop(name))
        else:
            self.x[name] = x

    def add_delta(self, name: str, delta: torch.Tensor) -> None:
        if name in self.x:
            self.emit(name, self.x.pop(name), delta)
        else:
            self.delta[name] = delta

    def emit(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        self.on_pair(name, x.reshape(-1, x.shape[-1]).float(), delta.reshape(-1, delta.shape[-1]).float())

    def check_complete(self) -> None:
        """After a backward pass: every layer that got a gradient also got its input (and vice versa)."""
        if self.delta:
            raise RuntimeError(f"No recomputed input reached layers {sorted(self.delta)[:3]} in the backward "
                               "pass; set gradient_checkpointing=False in QLoraGAConfig for this model.")
        self.x.clear()  # inputs of layers the loss does not depend on


def backward_pass(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict[str, torch.Tensor]],
    on_pair: PairHook,
    progress: tqdm | None = None,
    checkpointing: bool = False,
) -> int:
    """One forward and backward pass per batch; `on_pair(name, x, delta)` receives each target layer's
    input `x` and output gradient `delta = dL/dy` (both flattened to tokens x features, fp32).
    `checkpointing` recomputes each decoder block's activations in the backward pass.

    Returns the number of batches. The first target of `layers` sees an input that needs no grad and
    makes it a leaf: the backward pass stops there.
    """
    device = model_device(model)

    def make_leaf(module: nn.Module, args: tuple) -> tuple | None:
        if not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    pairs = Pairs(on_pair)
    blocks_name, _ = decoder_blocks(model)
    rerun = Rerun()

    def make_hook(name: str):
        deferred = checkpointing and block_index(name, blocks_name) is not None  # x taken at the re-run

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if deferred and rerun.active:
                pairs.add_x(name, args[0].detach())
                return
            output.register_hook(lambda delta: pairs.add_delta(name, delta))
            if not deferred:
                pairs.add_x(name, args[0].detach())

        return hook

    handles = []
    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(make_leaf))
        handles.append(module.register_forward_hook(make_hook(name)))
    n_batches = 0
    try:
        with gradient_pass(model), checkpointed_blocks(model, rerun) if checkpointing else nullcontext():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                loss = model(**inputs, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"The loss of gradient batch {n_batches} is {loss.item()}: check "
                                             "the data (every label masked?) and the model.")
                loss.backward()
                pairs.check_complete()
                n_batches += 1
                if progress is not None:
                    progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    if n_batches == 0:
        raise DataError("The gradient batches are empty: pass at least one batch (a dict with input_ids, "
                        "attention_mask and labels).")
    return n_batches


def accumulate_chunk(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[dict[str, torch.Tensor]],
    progress: tqdm | None = None,
    checkpointing: bool = False,
    covariances: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over batches of dL/dW = sum_t delta_t x_t^T (fp32, out x in), L being each batch's mean loss.

    `covariances`, when given, is filled in the same pass with each layer's mean over batches of
    `H = X^T X = sum_t x_t x_t^T` over the real tokens (attention mask 1; padding is no input the layer serves),
    fp32, in x in: the metric of the quantization-error fit (`error_fit.py`)."""
    accum = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=m.weight.device)
             for n, m in layers.items()}
    if covariances is not None:
        covariances.update({n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32,
                                           device=m.weight.device) for n, m in layers.items()})
    masks = MaskOf(batches)

    def add(name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        accum[name].addmm_(delta.T, x)
        if covariances is not None:
            x = masks.real_tokens(x)
            covariances[name].addmm_(x.T, x)

    n_batches = backward_pass(model, layers, masks if covariances is not None else batches, add, progress,
                              checkpointing)
    for acc in [*accum.values(), *(covariances or {}).values()]:
        acc /= n_batches
    return accum


class MaskOf:
    """The batches, remembering the attention mask of the one being processed (its x reach the hooks while it is
    current, in the forward or, checkpointed, in the backward pass)."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]]):
        self.batches, self.mask = batches, None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            self.mask = batch.get("attention_mask")
            yield batch

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of a flattened input (tokens x features) that belong to real tokens."""
        if self.mask is None or self.mask.numel() != x.shape[0]:
            return x
        return x[self.mask.reshape(-1).to(x.device).bool()]
