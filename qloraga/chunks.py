"""Chunk planning for the exact gradient estimate: which target layers accumulate together in one pass.

An fp32 accumulator costs `4 * out * in` bytes per layer, so the targets are split into chunks of
consecutive decoder blocks whose accumulators fit a memory budget (docs/ALGORITHM.md section 2).
"""

from __future__ import annotations

from torch import nn

from qloraga.targets import block_index, decoder_blocks

BYTES_FP32 = 4


def plan_chunks(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    *,
    init_memory_gb: float,
    chunk_blocks: int | None = None,
) -> list[list[str]]:
    """Split the targets into chunks of consecutive decoder blocks.

    Each chunk's fp32 accumulators (`4 * out * in` bytes per layer) fit `init_memory_gb`, unless a
    single block is larger (then it is a chunk of its own); `chunk_blocks` fixes the blocks per chunk.
    Targets outside the blocks (e.g. `lm_head`) join the last chunk.
    """
    blocks_name, _ = decoder_blocks(model)
    per_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in targets:
        idx = block_index(name, blocks_name)
        (outside if idx is None else per_block.setdefault(idx, [])).append(name)

    def nbytes(names: list[str]) -> int:
        return sum(BYTES_FP32 * targets[n].out_features * targets[n].in_features for n in names)

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
