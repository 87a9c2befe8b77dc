"""`QLoraGAConfig`: the one place where the defaults of a LoRA-GA initialisation live."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")
INITS = ("lora-ga", "lora")
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


@dataclass
class RunConfig:
    """Everything one fine-tuning run needs. Defaults here; presets, `--config` files and flags override them.

    `model`, `dataset` and `eval_dataset` default to the embedded demo (a tiny self-trained Llama and its
    arithmetic word problems), so that a run with no argument works anywhere.
    """

    model: str = "demo"
    preset: str | None = None
    dataset: str = "demo"
    eval_dataset: str | None = None
    dataset_format: str = "auto"
    output_dir: str | None = None
    load_in_4bit: bool = False
    init: str = "lora-ga"
    ga_batches: int = 8
    max_steps: int = -1
    epochs: float = 1.0
    lr: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 4
    seq_len: int = 1024
    packing: bool = False
    gradient_checkpointing: bool = True
    optim: str = "auto"  # paged 8-bit AdamW on a GPU, AdamW on a CPU
    save_steps: int = 200
    logging_steps: int = 10
    resume: bool = False
    overwrite: bool = False
    seed: int = 42
    eval_split: float = 0.05
    eval_samples: int = 200
    merge: bool = False
    chat_template: str | None = None
    trust_remote_code: bool = False
    lora_ga: QLoraGAConfig = field(default_factory=QLoraGAConfig)

    def validate(self) -> RunConfig:
        check_choice("init", self.init, INITS)
        if self.ga_batches < 1:
            raise ValueError(f"--ga-batches must be at least 1, got {self.ga_batches}.")
        for name in ("batch_size", "grad_accum", "seq_len", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("Give a positive --max-steps or --epochs.")
        self.lora_ga.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a (merged) mapping; unknown keys are an error that lists the valid ones."""
        values = dict(values)
        lora_ga = QLoraGAConfig.from_dict(values.pop("lora_ga", None) or {})
        known = {f.name for f in fields(cls)} - {"lora_ga"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown setting(s) {unknown}: valid ones are {sorted(known | {'lora_ga'})}.")
        return cls(**values, lora_ga=lora_ga).validate()


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, one level deep for the `lora_ga` section."""
    merged = {**base, **{k: v for k, v in override.items() if k != "lora_ga"}}
    merged["lora_ga"] = {**(base.get("lora_ga") or {}), **(override.get("lora_ga") or {})}
    return merged
