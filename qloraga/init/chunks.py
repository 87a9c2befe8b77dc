"""Chunk planning for the exact gradient estimate, and the one memory model of a run's phases.

An fp32 accumulator costs `4 * out * in` bytes per layer, so the targets are split into chunks of
consecutive decoder blocks whose accumulators fit a memory budget (docs/ALGORITHM.md section 2). Each chunk
is one pass over the gradient batches, so fewer chunks is faster. With `init_memory_gb="auto"`,
`auto_budget` gives the accumulators what is free when the init runs (it runs before training and frees
them after), less the init's own activations, factors and SVD workspace: one chunk wherever that fits,
one block per chunk only where memory is that tight. The dry run's estimate uses the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qloraga import distributed
from qloraga.config import resolve_optim
from qloraga.init.ranks import rank_cap
from qloraga.memory import free_memory_bytes
from qloraga.targets import block_index, decoder_blocks

BYTES_FP32 = 4
HEADROOM = 0.9  # share of the free memory the init may plan on (the rest: allocator slack, other processes)


@dataclass
class Budget:
    """The fp32 accumulator budget of one chunk, and where it came from (for the init's summary line)."""

    gb: float
    source: str = "init_memory_gb"  # or "free memory"
    free_gb: float = 0.0  # free device memory (CUDA) or MemAvailable (CPU)
    own_gb: float = 0.0  # what the init holds besides its accumulators: activations, factors, SVD workspace

    def describe(self, chunks: int) -> str:
        if self.source == "init_memory_gb":
            return f"budget {size(self.gb)} (init_memory_gb), {chunks} chunk(s)"
        why = "one pass" if chunks == 1 else "memory is tight" if self.gb < 1e-3 else "the accumulators exceed it"
        return (f"budget auto: {size(self.gb)} ({self.source} {size(self.free_gb)} x {HEADROOM:g} less "
                f"{size(self.own_gb)} of activations, factors and SVD workspace), {chunks} chunk(s): {why}")


def size(gib: float) -> str:
    """GiB as a person reads it: MiB below one GiB (a tiny model's budget is not "0.00 GB")."""
    return f"{gib * 1024:.1f} MiB" if gib < 1 else f"{gib:.2f} GiB"


def adapter_params(targets: dict[str, nn.Linear], r: int) -> int:
    return sum(r * (m.in_features + m.out_features) for m in targets.values())


def accumulator_bytes(m: nn.Linear, covariance: bool = False) -> int:
    """One layer's fp32 accumulators in a chunk: its gradient (out x in) and, for the quantization-error fit,
    its inputs' `X^T X` (in x in)."""
    return BYTES_FP32 * (m.out_features * m.in_features + (m.in_features**2 if covariance else 0))


def svd_floats(rows: int, cols: int, svd_niter: int | None, r: int) -> int:
    """fp32 values the SVD of one rows x cols matrix allocates besides the matrix. Exact (`torch.linalg.svd`,
    LAPACK gesdd, `full_matrices=False`): a copy, U (m x k), Vt (k x n) and about `4 k^2` of work, k = min(m, n).
    Randomized (`svd_niter`): a few (m + n) x 4r panels."""
    k = min(rows, cols)
    return rows * cols + rows * k + k * cols + 4 * k * k if svd_niter is None else 3 * (rows + cols) * 4 * r


def svd_workspace_bytes(targets: dict[str, nn.Linear], svd_niter: int | None, r: int) -> int:
    """fp32 bytes the SVD of the largest target's gradient allocates besides the gradient itself."""
    return BYTES_FP32 * max(svd_floats(m.out_features, m.in_features, svd_niter, r) for m in targets.values())


def error_fit_workspace_bytes(targets: dict[str, nn.Linear], svd_niter: int | None, r: int) -> int:
    """fp32 bytes the quantization-error fit of the largest target holds besides its `X^T X` (`error_fit.py`):
    the original weight, the error E and `E S` (out x in each), the damped `X^T X` and its Cholesky factor
    (in x in each), and the SVD of `E S`."""
    return BYTES_FP32 * max(3 * m.out_features * m.in_features + 2 * m.in_features**2
                            + svd_floats(m.out_features, m.in_features, svd_niter, r) for m in targets.values())


def activation_bytes(config, tokens: int, width: int, checkpointing: bool) -> int:
    """A rough upper bound of one batch's activations from a model's config (`width`: bytes of the compute
    dtype): with checkpointing each block's input and one block's recomputed activations, without it every
    block's; plus fp32 logits and their gradient."""
    hidden = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", 0) or 0
    per_block = (4 * hidden + 3 * inner) * width
    blocks = hidden * layers * width + per_block if checkpointing else per_block * layers
    return tokens * (blocks + vocab * 8)


def moment_bytes(optim: str, cuda: bool) -> int:
    """Bytes per trainable parameter of the optimizer's two moments: 2 for an 8-bit AdamW, 8 in fp32."""
    return 2 if "8bit" in resolve_optim(optim, cuda) else 8


def training_step_bytes(params: int, adapter_bytes: int, moments: int) -> int:
    """A training step's adapter state above the weights and activations: A and B, their gradients and the
    frozen A0, B0 of the correction in the adapter dtype, plus the optimizer's two moments."""
    return params * (3 * adapter_bytes + moments)


def held_floats(targets: dict[str, nn.Linear], config) -> int:
    """fp32 values the exact init keeps for every target until it ends (`config`: a `QLoraGAConfig`): its
    factors. Under the gradient allocation no layer is factorised before every chunk's importance is known;
    finished chunks' summaries wait on disk (`pipeline.Finisher`), so in memory: the factors (the same budget
    of parameters) and one chunk's summaries at their largest rank `cap` (LoRA-One: `cap` singular triplets,
    LoRA-GA: `2 cap`, GoRA: `G A^T`, out x cap), bounded here by the largest layer's."""
    held = adapter_params(targets, config.r) * (2 if config.quant_error != "off" else 1)  # + the fits' factors
    if config.rank_allocation == "uniform":
        return held
    worst = 0
    for m in targets.values():
        rows = m.out_features if config.method == "gora" else m.out_features + m.in_features + 1
        worst = max(worst, rows * rank_cap(m, config) * (2 if config.method == "lora-ga" else 1))
    return held + worst


def init_own_bytes(targets: dict[str, nn.Linear], r: int, svd_niter: int | None, held: int | None = None,
                   quant_error: bool = False) -> int:
    """What the exact init holds besides its accumulators and activations: every target's fp32 factors (or
    `held` values, `held_floats`) and one layer's SVD workspace, or its quantization-error fit's (one after the
    other, never both at once)."""
    held = adapter_params(targets, r) if held is None else held
    workspace = svd_workspace_bytes(targets, svd_niter, r)
    if quant_error:
        workspace = max(workspace, error_fit_workspace_bytes(targets, svd_niter, r))
    return held * BYTES_FP32 + workspace


def free_budget(free: int, activations: int, own: int) -> Budget:
    """`init_memory_gb="auto"` from the free bytes: `HEADROOM * free - activations - own`, at least 0 (one
    block per chunk)."""
    return Budget(max(HEADROOM * free - activations - own, 0) / 2**30, "free memory", free / 2**30,
                  (activations + own) / 2**30)


def batch_tokens(batches: Iterable[dict]) -> int:
    """Tokens of the first batch (a batch is a dict with `input_ids`); 0 where it cannot be read."""
    try:
        ids = next(iter(batches))["input_ids"]
    except (StopIteration, KeyError, TypeError):
        return 0
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def auto_budget(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict], *, r: int,
                svd_niter: int | None, checkpointing: bool, free_bytes: int | None = None,
                held: int | None = None, quant_error: bool = False) -> Budget:
    """`init_memory_gb="auto"`: the chunk's accumulators get the memory free on the targets' device (CUDA
    `mem_get_info`, CPU `MemAvailable`) less this init's activations, fp32 factors and SVD workspace
    (`free_budget`). Every process uses rank 0's budget (the same chunks everywhere)."""
    device = next(iter(targets.values())).weight.device
    width = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 2)
    activations = activation_bytes(getattr(model, "config", None), batch_tokens(batches), width, checkpointing)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    own = init_own_bytes(targets, r, svd_niter, held, quant_error)
    return distributed.broadcast_object(free_budget(free, activations, own))


def plan_chunks(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    *,
    init_memory_gb: float,
    chunk_blocks: int | None = None,
    covariance: bool = False,
) -> list[list[str]]:
    """Split the targets into chunks of consecutive decoder blocks.

    Each chunk's fp32 accumulators (`accumulator_bytes`: `4 * out * in` bytes per layer, plus `4 * in * in` for
    the `X^T X` of the quantization-error fit with `covariance`) fit `init_memory_gb`, unless a single block is
    larger (then it is a chunk of its own); `chunk_blocks` fixes the blocks per chunk.
    Targets outside the blocks (e.g. `lm_head`) join the last chunk.
    """
    blocks_name, _ = decoder_blocks(model)
    per_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in targets:
        idx = block_index(name, blocks_name)
        (outside if idx is None else per_block.setdefault(idx, [])).append(name)

    def nbytes(names: list[str]) -> int:
        return sum(accumulator_bytes(targets[n], covariance) for n in names)

    budget = init_memory_gb * 2**30
    chunks: list[list[str]] = []
    current: list[str] = []
    blocks_in_current = 0
    for idx in sorted(per_block):
        names = per_block[idx]
        full = (blocks_in_current >= chunk_blocks) if chunk_blocks else (nbytes(current + names) > budget)
        if current and full:
            chunks.append(current)
            current, blocks_in_current = [], 0
        current = current + names
        blocks_in_current += 1
    if current or outside:
        chunks.append(current + outside)
    return chunks


def split_chunk(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]] | None:
    """The chunk's blocks in two halves (targets outside the blocks go with the second), or None for one block."""
    blocks_name, _ = decoder_blocks(model)
    blocks = sorted({i for n in names if (i := block_index(n, blocks_name)) is not None})
    if len(blocks) < 2:
        return None
    first = set(blocks[: len(blocks) // 2])
    return ([n for n in names if block_index(n, blocks_name) in first],
            [n for n in names if block_index(n, blocks_name) not in first])


def chunk_budget(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict], config) -> Budget:
    """The budget `config.init_memory_gb` (a `QLoraGAConfig`) asks for: its number of GiB, or `auto_budget`."""
    if config.init_memory_gb != "auto":
        return Budget(float(config.init_memory_gb))
    return auto_budget(model, targets, batches, r=config.r, svd_niter=config.svd_niter,
                       checkpointing=config.gradient_checkpointing, held=held_floats(targets, config),
                       quant_error=config.quant_error != "off")
