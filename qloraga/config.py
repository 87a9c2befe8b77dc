"""`QLoraGAConfig`: the one place where the defaults of a LoRA-GA initialisation live."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
REPORT_TO = ("auto", "none", "tensorboard", "wandb")  # auto: tensorboard where it is installed, else none
QUANT_STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float32": torch.float32}
ADAPTER_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# The embedded demo (`model: demo`, `dataset: demo`): a tiny self-trained Llama and its word problems.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_TRAIN = DEMO_DIR / "data" / "train.jsonl"
DEMO_EVAL = DEMO_DIR / "data" / "eval.jsonl"


class ConfigError(ValueError):
    """A setting the user can fix; the message names the setting (or file and line) and the fix."""


# LoRA-GA settings with a command-line flag: flag dest -> key in the `lora_ga` section.
LORA_GA_FLAGS = {"rank": "r", "alpha": "lora_alpha", "init_memory_gb": "init_memory_gb", "direction": "direction",
                 "estimator": "estimator", "power_iters": "power_iters", "oversample": "oversample"}
# Run settings that only a YAML file (--config or a preset) sets; every other one has the flag of its name.
YAML_ONLY = {"lr_scheduler", "warmup_ratio", "weight_decay", "chat_template", "precond_eps"}
FLAG_DESTS = {"load_in_4bit": "4bit"}  # where the flag is not the key with dashes


def option(key: str) -> str:
    """A setting as the user writes it, flag and YAML key: `--rank / lora_ga.r`, `--seq-len / seq_len`, or the
    YAML key alone (`lora_ga.scale`) when no flag sets it. `key` is a run key or `lora_ga.<key>`."""
    if key.startswith("lora_ga."):
        dest = next((d for d, k in LORA_GA_FLAGS.items() if k == key.removeprefix("lora_ga.")), None)
    else:
        dest = None if key in YAML_ONLY else FLAG_DESTS.get(key, key)
    return f"--{dest.replace('_', '-')} / {key}" if dest else key


def gib_or_auto(text: str) -> float | str:
    """`--init-memory-gb`: a number of GiB, or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number of GiB nor 'auto': {text!r}") from None


def check_choice(name: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Raise a ConfigError (a ValueError) that names the valid choices."""
    if value not in valid:
        raise ConfigError(f"Unknown {name}: {value!r}; choose one of {', '.join(map(repr, valid))}.")


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


def typed(cls: type, values: dict[str, Any], section: str = "") -> dict[str, Any]:
    """Check `values` against the field types of dataclass `cls`: a YAML typo gives a ConfigError, not a
    TypeError from deep inside. Ints are accepted where floats are expected. `section` ("lora_ga.") prefixes
    the keys in messages."""
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
            raise ConfigError(f"{option(section + name)} must be {wanted}, got {value!r}.")
        out[name] = float(value) if hint is float else value
    return out


@dataclass
class QLoraGAConfig:
    """How to initialise and wire the LoRA-GA adapters (formulas: docs/ALGORITHM.md section 1).

    `target_modules=None` targets every linear layer inside the decoder blocks, i.e. every
    attention and MLP projection of any family (Llama, Mistral, Qwen2, Gemma, Phi-3, ...).
    `init_memory_gb` bounds the fp32 gradient accumulators of one chunk of decoder blocks, in GiB, or "auto"
    (the default): sized from the device's free memory and the projected training step (qloraga/chunks.py,
    `auto_budget`); `chunk_blocks` fixes the number of blocks per chunk instead.
    """

    r: int = 8
    lora_alpha: float = 16.0
    method: str = "lora-ga"  # or "lora-one": no correction, step 0 carries a scaled rank-r gradient step
    target_modules: list[str] | None = None
    lora_dropout: float = 0.0
    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    # LoRA-One's gamma (the same `stable` formula): step 0 moves each weight by `s sqrt(out) / gamma` in
    # spectral norm. The paper code's 16 moved SmolLM2's 576-wide layers by 3 and raised its held-out loss
    # from 5.2 to 62; 1024-4096 lowered it at step 0 (validation splits of bench/real_convergence.py).
    lora_one_gamma: float = 2048.0
    init_memory_gb: float | str = "auto"
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
        for name, valid in [("method", METHODS), ("direction", DIRECTIONS), ("scale", SCALES),
                            ("adapter_dtype", list(ADAPTER_DTYPES)), ("estimator", ESTIMATORS)]:
            check_choice(option(f"lora_ga.{name}"), getattr(self, name), valid)
        for name in ("oversample", "power_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{option('lora_ga.' + name)} must be 0 or more, got {getattr(self, name)}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{option('lora_ga.r')} (the LoRA rank) must be a positive integer, got {self.r!r}: "
                              "use e.g. 8 or 16.")
        if not self.lora_alpha > 0:
            raise ConfigError(f"{option('lora_ga.lora_alpha')} must be positive, got {self.lora_alpha!r}: use e.g. "
                              "twice the rank.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{option('lora_ga.lora_dropout')} must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.stable_gamma > 0:
            raise ConfigError(f"{option('lora_ga.stable_gamma')} must be positive, got {self.stable_gamma!r}.")
        if isinstance(self.init_memory_gb, str) and self.init_memory_gb != "auto":
            raise ConfigError(f"{option('lora_ga.init_memory_gb')} must be a number of GiB or \"auto\", got "
                              f"{self.init_memory_gb!r}.")
        if not isinstance(self.init_memory_gb, str):
            if isinstance(self.init_memory_gb, bool) or not self.init_memory_gb > 0:
                raise ConfigError(f"{option('lora_ga.init_memory_gb')} must be positive or \"auto\", got "
                                  f"{self.init_memory_gb!r}.")
            self.init_memory_gb = float(self.init_memory_gb)
        if self.chunk_blocks is not None and self.chunk_blocks < 1:
            raise ConfigError(f"{option('lora_ga.chunk_blocks')} must be at least 1 (or null to plan from "
                              f"init_memory_gb), got {self.chunk_blocks!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QLoraGAConfig:
        """Build from a mapping, refusing unknown keys and wrong types (a typo must not pass silently)."""
        return cls(**typed(cls, values, "lora_ga.")).validate()


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
    dataset_split: str = "train"  # split of a hub --dataset
    eval_dataset_split: str | None = None  # split of a hub --eval-dataset, or of --dataset for the held-out set
    dataset_format: str = "auto"
    output_dir: str | None = None
    load_in_4bit: bool = False
    dtype: str = "bfloat16"  # compute dtype (NF4) or weight dtype; float32 where a CPU lacks bf16 kernels
    quant_storage: str = "uint8"  # bfloat16 under FSDP (configs/accelerate/fsdp_qlora.yaml)
    # LoRA-One: fastest to plain QLoRA's final loss and lowest final loss on both real-model tasks at tuned
    # learning rates (BENCHMARKS.md section 6); `--init lora-ga` is the paper-exact LoRA-GA (step 0 = the base).
    init: str = "lora-one"
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
    eval_steps: int = 200  # held-out loss every N optimizer steps during training (0: only before and after)
    eval_samples: int = 200  # exact-match generations before and after (short-answer data only; 0: none)
    report_to: str = "auto"
    merge: bool = False
    chat_template: str | None = None
    trust_remote_code: bool = False
    lora_ga: QLoraGAConfig = field(default_factory=QLoraGAConfig)

    def validate(self) -> RunConfig:
        for name, valid in [("init", INITS), ("quant_storage", list(QUANT_STORAGE)), ("dtype", list(COMPUTE_DTYPES)),
                            ("report_to", REPORT_TO)]:
            check_choice(option(name), getattr(self, name), valid)
        for name in ("ga_batches", "batch_size", "grad_accum", "seq_len", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{option(name)} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"{option('lr')} must be positive, got {self.lr}.")
        if self.max_steps <= 0 and not 0 < self.epochs < math.inf:
            raise ConfigError(f"Give a positive {option('max_steps')} or {option('epochs')}.")
        if not 0 < self.eval_split < 1:
            raise ConfigError(f"{option('eval_split')} must be between 0 and 1, got {self.eval_split}.")
        if not self.precond_eps > 0:
            raise ConfigError(f"{option('precond_eps')} must be positive, got {self.precond_eps}.")
        for name in ("eval_samples", "eval_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{option(name)} must be 0 or more, got {getattr(self, name)}.")
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
