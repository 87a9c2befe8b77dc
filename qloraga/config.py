"""The settings of a run and of its initialisation: the one place where each setting is declared.

Each field is declared once with its type (`Literal` for choices), its default and, in its metadata, its
help line and its flag (`setting()`). The `qloraga finetune` parser (`cli/finetune.py`), the YAML presets and
`--config` files (checked against the same types) and the saved `config.yaml` all derive from these classes;
`option()` names a setting as a user writes it, in every error message.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch

from qloraga.errors import ConfigError

Direction = Literal["ArB2r", "A2rBr", "ArBr", "random"]
Scale = Literal["stable", "gd", "unit", "weight_svd"]
Estimator = Literal["exact", "sketch"]
Method = Literal["lora-ga", "lora-one", "gora"]  # gradient-aligned inits the library computes
Init = Literal["lora-ga", "lora-one", "gora", "lora"]  # what a run can start from (lora: PEFT's plain B = 0)
# Per-layer ranks: the same r everywhere, or GoRA's allocation from each layer's gradient at the same budget;
# its importance: GoRA's sensitivity mean |W * G|, or the norm of the gradient's best rank-r part.
RankAllocation = Literal["uniform", "gradient"]
Importance = Literal["sensitivity", "spectrum"]
# The quantization-error fit (docs/ALGORITHM.md section 9): off, or the metric of its rank-r fit of W - deq(Wq):
# the layer's inputs (X^T X), their diagonal, or none (the weight-space SVD).
QuantError = Literal["off", "activation", "diagonal", "weight"]
DatasetFormat = Literal["auto", "alpaca", "messages", "prompt-completion", "sharegpt", "text"]
DtypeName = Literal["bfloat16", "float32"]
QuantStorage = Literal["uint8", "bfloat16", "float32"]
ReportTo = Literal["auto", "none", "tensorboard", "wandb"]  # auto: tensorboard where it is installed, else none

DIRECTIONS, SCALES, ESTIMATORS = get_args(Direction), get_args(Scale), get_args(Estimator)
METHODS, INITS, REPORT_TO = get_args(Method), get_args(Init), get_args(ReportTo)
SCALED_OPTIMIZERS = ("scaled_adamw", "scaled_sgd")  # Riemannian-preconditioned (qloraga/optim.py)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float32": torch.float32}
ADAPTER_DTYPES = COMPUTE_DTYPES
# The peak learning rate each init wants when nothing else sets one (a preset may give one per init, `--lr`
# wins). LoRA-One and plain LoRA want plain QLoRA's rate: on SmolLM2-135M both were best at the same rate
# (BENCHMARKS.md section 6); 2e-4 is the QLoRA paper's for 7B-13B. LoRA-GA wants a full fine-tuning rate
# (2e-5 at 7B, the LoRA-GA paper's; 3-10x below QLoRA's on SmolLM2).
# GoRA trains a plain LoRA adapter started from the compressed gradient, no correction (as LoRA-One): the
# LoRA rate too, the GoRA paper's own comparisons run it at LoRA's rate (arXiv 2502.12171).
DEFAULT_LR = {"lora-one": 2e-4, "lora": 2e-4, "lora-ga": 2e-5, "gora": 2e-4}
# The embedded demo (`model: demo`, `dataset: demo`): a tiny self-trained Llama and its word problems.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_TRAIN = DEMO_DIR / "data" / "train.jsonl"
DEMO_EVAL = DEMO_DIR / "data" / "eval.jsonl"
# Where a run's section of initialisation settings lives in YAML; `initialization:` is accepted beside it.
SECTION, SECTION_ALIASES = "lora_ga", ("initialization",)


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = "", factory: Any = None,
            aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that carries its help line and flag: `flag=""` is `--` + the name with dashes,
    `None` a YAML-only setting; `aliases` are more flags that set it (spellings users already write)."""
    metadata = {"help": help, "flag": flag, "aliases": aliases}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(cls: type, name: str) -> str | None:
    """The flag of setting `name` of dataclass `cls`, or None when only YAML sets it."""
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    if meta.get("flag") is None:
        return None
    return meta["flag"] or "--" + name.replace("_", "-")


def option(key: str) -> str:
    """A setting as the user writes it, flag and YAML key: `--rank / lora_ga.r`, `--seq-len / seq_len`, or the
    YAML key alone (`lora_ga.scale`) when no flag sets it. `key` is a run key or `lora_ga.<key>`."""
    cls, name = (QLoraGAConfig, key.removeprefix(SECTION + ".")) if key.startswith(SECTION + ".") else (RunConfig, key)
    names = {f.name for f in fields(cls)}
    flag = flag_of(cls, name) if name in names else None
    return f"{flag} / {key}" if flag else key


def resolve_optim(name: str, cuda: bool | None = None) -> str:
    """transformers' optimizer name for `optim`: auto is the paged 8-bit AdamW on a GPU, AdamW on a CPU; a
    scaled optimizer is built by us (`TrainingArguments` gets AdamW's name)."""
    if name in SCALED_OPTIMIZERS:
        return "adamw_torch"
    if name != "auto":
        return name
    return "paged_adamw_8bit" if (torch.cuda.is_available() if cuda is None else cuda) else "adamw_torch"


def check_choice(name: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    """Raise a ConfigError (a ValueError) that names the valid choices."""
    if value not in valid:
        raise ConfigError(f"Unknown {name}: {value!r}; choose one of {', '.join(map(repr, valid))}.")


def fits(option: Any, value: Any) -> bool:
    """Whether `value` (from YAML, flags or code) is acceptable for the type `option`."""
    if get_origin(option) is Literal:
        return isinstance(value, str) and value in get_args(option)
    if option is bool or isinstance(value, bool):
        return option is bool and isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float))
    if option in (int, str):
        return isinstance(value, option)
    if get_origin(option) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if get_origin(option) is dict:
        return isinstance(value, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in value.values())
    return isinstance(option, type) and isinstance(value, option)


def describe_type(option: Any) -> str:
    if option is type(None):
        return "null"
    if get_origin(option) is Literal:
        return "one of " + ", ".join(map(repr, get_args(option)))
    if get_origin(option) is dict:
        return "a mapping of init to number"
    return getattr(option, "__name__", str(option))


def check_types(obj: Any, section: str = "") -> None:
    """Check every field of dataclass `obj` against its declared type (a YAML typo or a wrong value in code gives
    a ConfigError that names the setting, not a TypeError from deep inside); ints become floats where floats are
    declared. `section` ("lora_ga.") prefixes the keys in messages."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        if not (value is None and type(None) in options) and not any(fits(o, value) for o in options):
            wanted = " or ".join(describe_type(o) for o in options)
            raise ConfigError(f"{option(section + f.name)} must be {wanted}, got {value!r}.")
        if float in options and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))


def known_keys(cls: type, values: Any, section: str = "") -> dict[str, Any]:
    """`values` as keyword arguments of dataclass `cls`, refusing a non-mapping and unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section.rstrip('.') or cls.__name__} settings must be a mapping, got {values!r}.")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"Unknown setting(s) {[section + k for k in unknown]}: valid ones are "
                          f"{sorted(section + k for k in valid)}.")
    return dict(values)


@dataclass
class QLoraGAConfig:
    """How to initialise and wire the adapters (formulas: docs/ALGORITHM.md sections 1 and 3).

    The library's default method is LoRA-GA, on purpose, while a run's default init is LoRA-One: a library call
    that names no method gets a model that computes exactly the quantized base until it is trained (the frozen
    correction), the safe contract for code that wraps a model; a run chooses by measured convergence
    (BENCHMARKS.md section 6). `target_modules=None` targets every linear layer inside the decoder blocks.
    A run sets `method` from its `init` (one field picks the method).
    """

    r: int = setting(8, "LoRA rank r (a LoRA-GA adapter exports with rank 2r)", flag="--rank")
    lora_alpha: float = setting(16.0, "LoRA alpha (scaling alpha/r)", flag="--alpha")
    method: Method = setting("lora-ga", "gradient-aligned init the library computes (a run sets it from --init)",
                             flag=None)
    target_modules: list[str] | None = setting(None, "module names to adapt (null: every linear layer of the "
                                                     "decoder blocks)", flag=None)
    lora_dropout: float = setting(0.0, "dropout on the adapters' input", flag=None)
    direction: Direction = setting("ArB2r", "LoRA-GA direction: which singular vectors start A and B")
    scale: Scale = setting("stable", "LoRA-GA scale of the factors", flag=None)
    stable_gamma: float = setting(16.0, "LoRA-GA's gamma of the stable scale", flag=None)
    # LoRA-One's gamma (the same `stable` formula): step 0 moves each weight by `s sqrt(out) / gamma` in
    # spectral norm. The paper code's 16 moved SmolLM2's 576-wide layers by 3 and raised its held-out loss
    # from 5.2 to 62; 1024-4096 lowered it at step 0 (validation splits of bench/real_convergence.py).
    lora_one_gamma: float = setting(2048.0, "LoRA-One's gamma: step 0 moves a weight by s sqrt(out)/gamma",
                                    flag=None)
    # GoRA (He et al., arXiv 2502.12171; docs/ALGORITHM.md section 8): ranks from each layer's gradient at the
    # uniform run's trainable-parameter budget, every layer at the uniform run's scaling s = alpha / r.
    rank_allocation: RankAllocation = setting("uniform", "per-layer ranks: uniform (r everywhere) or gradient "
                                                         "(GoRA's allocation from each layer's gradient, the same "
                                                         "trainable parameters)")
    rank_importance: Importance = setting("sensitivity", "gradient allocation's importance per layer: sensitivity "
                                                         "(GoRA's mean |W * G|) or spectrum (||G_r||_F)", flag=None)
    rank_min: int | None = setting(None, "gradient allocation: smallest rank of a layer (null: r/2)", flag=None)
    rank_max: int | None = setting(None, "gradient allocation: largest rank of a layer (null: 4r)", flag=None)
    # GoRA's gamma: its initial product is -gamma sqrt(in/r) G A^+ A, whose expected Frobenius norm is
    # gamma ||G||_F (one gradient step of rate gamma, compressed on A's r random directions); the paper's 0.05.
    gora_gamma: float = setting(0.05, "GoRA's gamma: the initial product's expected norm is gamma ||G||_F",
                                flag=None)
    # Issue 26: a frozen rank-r start that recovers the 4-bit weights' error as the inputs see it, under the
    # init's own trainable start (its gradient step); folded at export, nothing is re-quantized.
    quant_error: QuantError = setting("off", "fit the 4-bit quantization error W - deq(Wq) into a frozen rank-r "
                                             "start under the init's own: activation (weighted by the layer's "
                                             "inputs X^T X), diagonal (by its diagonal), weight (plain SVD), or off; "
                                             "needs --4bit from an unquantized checkpoint")
    quant_error_damping: float = setting(0.01, "quantization-error fit: ridge on X^T X as a share of its mean "
                                               "diagonal (CorDA's damping)", flag=None)
    init_memory_gb: float | str = setting("auto", "memory budget (GiB) of one chunk's gradient accumulators, or "
                                                  "auto: the fewest passes the free memory allows")
    chunk_blocks: int | None = setting(None, "decoder blocks per chunk (null: planned from init_memory_gb)",
                                       flag=None)
    seed: int = setting(0, "seed of the init's random parts", flag=None)
    svd_niter: int | None = setting(None, "null: exact SVD of each gradient; an int: torch.svd_lowrank with that "
                                          "many iterations", flag=None)
    estimator: Estimator = setting("exact", "gradient estimator: exact (chunked fp32 G) or sketch (streaming, "
                                            "1 + power_iters passes)")
    oversample: int = setting(8, "sketch estimator: sketch width beyond 2r")
    power_iters: int = setting(1, "sketch estimator: extra passes over the gradient batches")
    # Recompute each decoder block's activations in the gradient passes' backward (as training's gradient
    # checkpointing does): one block's activations at a time instead of all, for ~1 more forward per pass.
    gradient_checkpointing: bool = setting(True, "checkpoint each block in the init's gradient passes",
                                           flag=None)
    # fp32: Adam steps at a full-fine-tuning rate vanish in bf16 adapters (8-bit mantissa); every preset agreed.
    adapter_dtype: DtypeName = setting("float32", "dtype of the trainable adapters", flag=None)
    cache_dir: str | None = setting(None, "where finished chunks' factors are kept across interruptions "
                                          "(default: the run's lora_ga_cache/)", flag=None)
    progress: bool = setting(True, "progress bars", flag=None)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        check_types(self, SECTION + ".")
        self.validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def rank_bounds(self) -> tuple[int, int]:
        """The smallest and largest rank a layer may get (both r under the uniform allocation)."""
        if self.rank_allocation == "uniform":
            return self.r, self.r
        return (max(1, self.r // 2) if self.rank_min is None else self.rank_min,
                4 * self.r if self.rank_max is None else self.rank_max)

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return ADAPTER_DTYPES[self.adapter_dtype]

    def validate(self) -> QLoraGAConfig:
        """Range checks (types and choices are checked on construction by `check_types`)."""
        for name in ("oversample", "power_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{option(SECTION + '.' + name)} must be 0 or more, got {getattr(self, name)}.")
        if self.r < 1:
            raise ConfigError(f"{option('lora_ga.r')} (the LoRA rank) must be a positive integer, got {self.r!r}: "
                              "use e.g. 8 or 16.")
        if not self.lora_alpha > 0:
            raise ConfigError(f"{option('lora_ga.lora_alpha')} must be positive, got {self.lora_alpha!r}: use e.g. "
                              "twice the rank.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{option('lora_ga.lora_dropout')} must be in [0, 1), got {self.lora_dropout!r}.")
        for name in ("rank_min", "rank_max"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{option(SECTION + '.' + name)} must be at least 1 (or null), got "
                                  f"{getattr(self, name)!r}.")
        low, high = self.rank_bounds
        if not low <= self.r <= high:
            raise ConfigError(f"{option('lora_ga.rank_min')} <= {option('lora_ga.r')} <= "
                              f"{option('lora_ga.rank_max')} must hold (the budget is the uniform rank's), got "
                              f"{low} <= {self.r} <= {high}.")
        for name in ("stable_gamma", "lora_one_gamma", "gora_gamma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{option(SECTION + '.' + name)} must be positive, got {getattr(self, name)!r}.")
        if isinstance(self.init_memory_gb, str) and self.init_memory_gb != "auto":
            raise ConfigError(f"{option('lora_ga.init_memory_gb')} must be a number of GiB or \"auto\", got "
                              f"{self.init_memory_gb!r}.")
        if not isinstance(self.init_memory_gb, str) and not self.init_memory_gb > 0:
            raise ConfigError(f"{option('lora_ga.init_memory_gb')} must be positive or \"auto\", got "
                              f"{self.init_memory_gb!r}.")
        if self.chunk_blocks is not None and self.chunk_blocks < 1:
            raise ConfigError(f"{option('lora_ga.chunk_blocks')} must be at least 1 (or null to plan from "
                              f"init_memory_gb), got {self.chunk_blocks!r}.")
        if not self.quant_error_damping > 0:
            raise ConfigError(f"{option('lora_ga.quant_error_damping')} must be positive, got "
                              f"{self.quant_error_damping!r}: use e.g. 0.01.")
        if self.quant_error != "off" and self.estimator == "sketch":
            raise ConfigError(f"{option('lora_ga.quant_error')} {self.quant_error} needs each layer's X^T X, which "
                              f"only the exact estimator accumulates: use {option('lora_ga.estimator')} exact, or "
                              f"{option('lora_ga.quant_error')} off.")
        if self.quant_error != "off" and self.rank_allocation != "uniform":
            raise ConfigError(f"{option('lora_ga.quant_error')} {self.quant_error} fits the error at the uniform rank "
                              f"r: use {option('lora_ga.rank_allocation')} uniform with it.")
        if self.svd_niter is not None and self.svd_niter < 1:
            raise ConfigError(f"{option('lora_ga.svd_niter')} must be at least 1 (or null for the exact SVD), got "
                              f"{self.svd_niter!r}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QLoraGAConfig:
        """Build from a mapping, refusing unknown keys and wrong types (a typo must not pass silently)."""
        return cls(**known_keys(cls, values, SECTION + "."))


@dataclass
class RunConfig:
    """Everything one fine-tuning run needs. Defaults here; presets, `--config` files and flags override them.

    `model`, `dataset` and `eval_dataset` default to the embedded demo (a tiny self-trained Llama and its
    arithmetic word problems), so that a run with no argument works anywhere. `lr` may be left unset (the
    init's rate, `DEFAULT_LR`) or given per init as a mapping (presets do); construction resolves it to one
    number for `init`.
    """

    model: str = setting("demo", "local model folder, a .gguf file (or a folder holding one), or a hub name "
                                 "(default: the embedded demo model)")
    preset: str | None = setting(None, "model family preset or a YAML path (default: detected from the model's "
                                       "model_type and size)")
    dataset: str = setting("demo", "JSON/JSONL/CSV/Parquet file or hub dataset NAME[:CONFIG] (default: the demo "
                                   "data)")
    eval_dataset: str | None = setting(None, "held-out file or hub NAME[:CONFIG]; default: --eval-split of "
                                             "--dataset")
    dataset_split: str = setting("train", "split of a hub --dataset to train on")
    eval_dataset_split: str | None = setting(None, "split of a hub --eval-dataset, or without one the split of "
                                                   "the hub --dataset held out (e.g. validation) instead of "
                                                   "--eval-split")
    dataset_format: DatasetFormat = setting("auto", "record format (auto: from the fields)")
    output_dir: str | None = setting(None, "where outputs go (default: runs/<model>-<time>)")
    load_in_4bit: bool = setting(False, "load the base in 4-bit NF4 (QLoRA); else bf16", flag="--4bit")
    dtype: DtypeName = setting("bfloat16", "compute dtype (bf16 default; float32 on CPUs without bf16 kernels, "
                                           "as the demo preset does)")
    quant_storage: QuantStorage | None = setting(None, "storage dtype of 4-bit weights (default: uint8, or a "
                                                       "pre-quantized checkpoint's own; bfloat16 for FSDP, see "
                                                       "configs/accelerate/)")
    # LoRA-One: fastest to plain QLoRA's final loss and lowest final loss on both real-model tasks at tuned
    # learning rates (BENCHMARKS.md section 6); `--init lora-ga` is the paper-exact LoRA-GA (step 0 = the base).
    init: Init = setting("lora-one", "adapter initialisation: lora-one (top-r of -G, no correction: step 0 "
                                     "carries a scaled gradient step), lora-ga (step 0 = the base, through a "
                                     "frozen correction), gora (random A, B from the "
                                     "gradient's pseudo-inverse: GoRA) or lora (plain B=0)")
    ga_batches: int = setting(8, "training batches the init estimates the gradient on",
                              aliases=("--init-batches",))
    max_steps: int = setting(-1, "optimizer steps (overrides --epochs when > 0)")
    epochs: float = setting(1.0, "passes over the training data")
    lr: float | dict[str, float] | None = setting(None, "peak learning rate (default: the init's own, from the "
                                                        "preset or the built-in table)")
    lr_scheduler: str = setting("cosine", "transformers' learning-rate schedule", flag=None)
    warmup_ratio: float = setting(0.03, "share of the steps spent warming up", flag=None)
    weight_decay: float = setting(0.0, "AdamW weight decay", flag=None)
    batch_size: int = setting(4, "sequences per device batch")
    grad_accum: int = setting(4, "batches accumulated per optimizer step")
    seq_len: int = setting(1024, "maximum tokens per sequence (longer samples are truncated)")
    packing: bool = setting(False, "join several samples into each sequence (each still attends only to itself)")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass")
    # Off until measured on a GPU (bench/gpu_acceptance.py); preflight refuses it where it cannot run.
    liger: bool = setting(False, "Liger's fused Triton kernels in training (RMSNorm, RoPE, SwiGLU, linear "
                                 "cross-entropy; CUDA GPUs, pip install liger-kernel)")
    optim: str = setting("auto", "optimizer: scaled_adamw or scaled_sgd (Riemannian-preconditioned LoRA "
                                 "factors), or a transformers name (auto: paged 8-bit AdamW on GPU, AdamW on CPU)")
    precond_eps: float = setting(1e-6, "ridge of the scaled optimizers' r x r preconditioners", flag=None)
    save_steps: int = setting(200, "write a checkpoint every N optimizer steps")
    logging_steps: int = setting(10, "log the training loss every N optimizer steps")
    resume: bool = setting(False, "continue the run in --output-dir from its last checkpoint")
    overwrite: bool = setting(False, "replace an existing run in --output-dir")
    seed: int = setting(42, "random seed of data order, dropout and init")
    eval_split: float = setting(0.05, "fraction of --dataset held out when no --eval-dataset is given")
    eval_steps: int = setting(200, "held-out loss every N optimizer steps during training (0: only before and "
                                   "after)")
    eval_samples: int = setting(200, "held-out samples scored by exact match before and after training, on "
                                     "short-answer prompt-completion/alpaca data (0: off)")
    report_to: ReportTo = setting("auto", "where the Trainer also logs: tensorboard, wandb, none (auto: "
                                          "tensorboard if installed); metrics.jsonl is always written")
    merge: bool = setting(False, "also write a merged bf16 model")
    chat_template: str | None = setting(None, "a Jinja chat template (null: the tokenizer's own)", flag=None)
    trust_remote_code: bool = setting(False, "run the model repository's own code (off by default)")
    lora_ga: QLoraGAConfig = setting(help="the initialisation's settings", flag=None, factory=QLoraGAConfig)

    def __post_init__(self) -> None:
        if isinstance(self.lora_ga, dict):
            self.lora_ga = QLoraGAConfig.from_dict(self.lora_ga)
        check_types(self)
        if self.lr is None or isinstance(self.lr, dict):
            self.lr = float((self.lr or {}).get(self.init, DEFAULT_LR[self.init]))
        if self.init in METHODS:  # one field picks the method: the saved config says the method that ran
            self.lora_ga.method = self.init
        self.validate()

    def validate(self) -> RunConfig:
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
        if self.init == "lora" and self.lora_ga.rank_allocation != "uniform":
            raise ConfigError(f"{option('lora_ga.rank_allocation')} {self.lora_ga.rank_allocation} allocates "
                              "ranks from the gradient, which --init lora does not compute: use --init lora-one, "
                              "lora-ga or gora, or --rank-allocation uniform.")
        self.lora_ga.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a (merged) mapping; unknown keys are an error that lists the valid ones."""
        values = canonical_sections(known_keys(cls, canonical_sections(values)))
        section = values.pop(SECTION, None) or {}
        return cls(**values, lora_ga=QLoraGAConfig.from_dict(section))


def canonical_sections(values: dict[str, Any]) -> dict[str, Any]:
    """`initialization:` (the neutral spelling) read as `lora_ga:`; both at once is an error."""
    if not isinstance(values, dict):
        raise ConfigError(f"Settings must be a mapping, got {values!r}.")
    values = dict(values)
    for alias in SECTION_ALIASES:
        if alias in values:
            if SECTION in values:
                raise ConfigError(f"Give the initialisation's settings once: '{SECTION}:' or '{alias}:', not both.")
            values[SECTION] = values.pop(alias)
    return values


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, one level deep for the `lora_ga` section."""
    base, override = canonical_sections(base), canonical_sections(override)
    sections = [base.get(SECTION) or {}, override.get(SECTION) or {}]
    if not all(isinstance(s, dict) for s in sections):
        raise ConfigError(f"Setting '{SECTION}' must be a mapping of initialisation settings, got {sections[1]!r}.")
    merged = {**base, **{k: v for k, v in override.items() if k != SECTION}}
    merged[SECTION] = {**sections[0], **sections[1]}
    return merged
