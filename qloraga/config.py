"""`QLoraGAConfig`: the one place where the defaults of a LoRA-GA initialisation live."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")
ADAPTER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def check_choice(name: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Raise a ValueError that names the valid choices."""
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}: choose one of {', '.join(map(repr, valid))}.")


@dataclass
class QLoraGAConfig:
    """How to initialise and wire the LoRA-GA adapters (formulas: shared ALGORITHM.md section 2).

    `target_modules=None` targets every linear layer inside the decoder blocks, i.e. every
    attention and MLP projection of any family (Llama, Mistral, Qwen2, Gemma, Phi-3, ...).
    `init_memory_gb` bounds the fp32 gradient accumulators of one chunk of decoder blocks;
    `chunk_blocks` fixes the number of blocks per chunk instead.
    """

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] | None = None
    lora_dropout: float = 0.0
    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    init_memory_gb: float = 4.0
    chunk_blocks: int | None = None
    seed: int = 0
    svd_niter: int | None = None  # None: exact SVD; an int: torch.svd_lowrank with that many iterations
    adapter_dtype: str = "bfloat16"
    cache_dir: str | None = None  # where finished chunks' factors are kept across interruptions
    progress: bool = True

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return ADAPTER_DTYPES[self.adapter_dtype]

    def validate(self) -> QLoraGAConfig:
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("scale", self.scale, SCALES)
        check_choice("adapter_dtype", self.adapter_dtype, list(ADAPTER_DTYPES))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}: use e.g. r=8.")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}: use e.g. 2*r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be positive, got {self.stable_gamma!r}.")
        if self.init_memory_gb <= 0:
            raise ValueError(f"init_memory_gb must be positive, got {self.init_memory_gb!r}.")
        if self.chunk_blocks is not None and self.chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be at least 1 (or None to plan from init_memory_gb), "
                             f"got {self.chunk_blocks!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QLoraGAConfig:
        """Build from a mapping, refusing keys this config does not have (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown LoRA-GA setting(s) {unknown}: valid ones are {sorted(known)}.")
        return cls(**values).validate()
