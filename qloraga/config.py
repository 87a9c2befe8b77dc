"""`QLoraGAConfig`: the one place where the defaults of a LoRA-GA initialisation live."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")
ESTIMATORS = ("exact", "sketch")
METHODS = ("lora-ga", "lora-one")  # gradient-aligned inits the library computes
INITS = (*METHODS, "lora")  # what a run can start from (lora: PEFT's plain B = 0)
SCALED_OPTIMIZERS = ("scaled_adamw", "scaled_sgd")  # Riemannian-preconditioned (qloraga/optim.py)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float32": torch.float32}
ADAPTER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class ConfigError(ValueError):
    """A setting the user can fix; the message names the setting (or file and line) and the fix."""


def check_choice(name: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Raise a ConfigError (a ValueError) that names the valid choices."""
    if value not in valid:
        raise ConfigError(f"Unknown {name} {value!r}: choose one of {', '.join(map(repr, valid))}.")


def fits(option: Any, value: Any) -> bool:
    """Whether `value` (from YAML or flags) is acceptable for the type `option`."""
    if option is bool or isinstance(value, bool):
        return option is bool and isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float))
    if option in (int, str):
        return isinstance(value, option)
    if get_origin(option) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(option, type) and isinstance(value, option)


def typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Check `values` against the field types of dataclass `cls`: a YAML typo gives a ConfigError, not a
    TypeError from deep inside. Ints are accepted where floats are expected."""
    if not isinstance(values, dict):
        raise ConfigError(f"{cls.__name__} settings must be a mapping, got {values!r}.")
    hints = get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"Unknown setting(s) {unknown} for {cls.__name__}: valid ones are {sorted(hints)}.")
    out = {}
    for name, value in values.items():
        hint = hints[name]
        options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        if not (value is None and type(None) in options) and not any(fits(o, value) for o in options):
            wanted = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
            raise ConfigError(f"Setting {name!r} must be {wanted}, got {value!r}.")
        out[name] = float(value) if hint is float else value
    return out


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
    method: str = "lora-ga"  # or "lora-one": no correction, step 0 carries a scaled rank-r gradient step
    target_modules: list[str] | None = None
    lora_dropout: float = 0.0
    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    init_memory_gb: float = 4.0
    chunk_blocks: int | None = None
    seed: int = 0
    svd_niter: int | None = None  # None: exact SVD; an int: torch.svd_lowrank with that many iterations
    estimator: str = "exact"  # or "sketch": one-pass streaming sketch of all layers (qloraga/sketch.py)
    oversample: int = 8  # sketch width beyond 2r
    power_iters: int = 1  # extra sketch passes
    # Recompute each decoder block's activations in the gradient passes' backward (as training's gradient
    # checkpointing does): one block's activations at a time instead of all, for ~1 more forward per pass.
    gradient_checkpointing: bool = True
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
        check_choice("method", self.method, METHODS)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("scale", self.scale, SCALES)
        check_choice("adapter_dtype", self.adapter_dtype, list(ADAPTER_DTYPES))
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.oversample < 0 or self.power_iters < 0:
            raise ConfigError(f"oversample and power_iters must be 0 or more, got {self.oversample} and "
                              f"{self.power_iters}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}: use e.g. r=8.")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}: use e.g. 2*r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.stable_gamma > 0:
            raise ConfigError(f"stable_gamma must be positive, got {self.stable_gamma!r}.")
        if not self.init_memory_gb > 0:
            raise ConfigError(f"init_memory_gb must be positive, got {self.init_memory_gb!r}.")
        if self.chunk_blocks is not None and self.chunk_blocks < 1:
            raise ConfigError(f"chunk_blocks must be at least 1 (or None to plan from init_memory_gb), "
                             f"got {self.chunk_blocks!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QLoraGAConfig:
        """Build from a mapping, refusing unknown keys and wrong types (a typo must not pass silently)."""
        return cls(**typed(cls, values)).validate()


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
    dtype: str = "bfloat16"  # compute dtype (NF4) or weight dtype; float32 where a CPU lacks bf16 kernels
    quant_storage: str = "uint8"  # bfloat16 under FSDP (configs/accelerate/fsdp_qlora.yaml)
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
    optim: str = "auto"  # paged 8-bit AdamW on a GPU, AdamW on a CPU; or scaled_adamw / scaled_sgd (qloraga/optim.py)
    precond_eps: float = 1e-6  # ridge of the scaled optimizers' r x r preconditioners
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
        check_choice("quant_storage", self.quant_storage, list(QUANT_STORAGE))
        check_choice("dtype", self.dtype, list(COMPUTE_DTYPES))
        if self.ga_batches < 1:
            raise ConfigError(f"--ga-batches must be at least 1, got {self.ga_batches}.")
        for name in ("batch_size", "grad_accum", "seq_len", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be positive, got {self.lr}.")
        if self.max_steps <= 0 and not 0 < self.epochs < math.inf:
            raise ConfigError("Give a positive --max-steps or --epochs.")
        if not 0 < self.eval_split < 1:
            raise ConfigError(f"--eval-split must be between 0 and 1, got {self.eval_split}.")
        if not self.precond_eps > 0:
            raise ConfigError(f"precond_eps must be positive, got {self.precond_eps}.")
        if self.eval_samples < 0:
            raise ConfigError(f"--eval-samples must be 0 or more, got {self.eval_samples}.")
        self.lora_ga.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a (merged) mapping; unknown keys are an error that lists the valid ones."""
        values = dict(values)
        section = values.pop("lora_ga", None) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"Setting 'lora_ga' must be a mapping of LoRA-GA settings, got {section!r}.")
        return cls(**typed(cls, values), lora_ga=QLoraGAConfig.from_dict(section)).validate()


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, one level deep for the `lora_ga` section."""
    sections = [base.get("lora_ga") or {}, override.get("lora_ga") or {}]
    if not all(isinstance(s, dict) for s in sections):
        raise ConfigError(f"Setting 'lora_ga' must be a mapping of LoRA-GA settings, got {sections[1]!r}.")
    merged = {**base, **{k: v for k, v in override.items() if k != "lora_ga"}}
    merged["lora_ga"] = {**sections[0], **sections[1]}
    return merged
