"""Load a causal LM in 4-bit NF4 (or bf16), and keep bitsandbytes' CPU weight repacking out of the way.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight in place at its first
inference forward; afterwards `dequantize_4bit` returns wrong values and the forward has no autograd
kernel (docs/ALGORITHM.md section 6). Every model that passes through qloraga has that switched off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from qloraga.config import COMPUTE_DTYPES, QUANT_STORAGE, RunConfig, option
from qloraga.errors import ConfigError, ModelSourceError
from qloraga.io import atomic_dir


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16, quant_storage: torch.dtype = torch.uint8
               ) -> BitsAndBytesConfig:
    """NF4 with double quantization and bf16 compute: the QLoRA recipe. FSDP needs `quant_storage` equal
    to the compute dtype, so that it can flatten 4-bit weights together with the others."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def default_device_map() -> str | dict[str, int]:
    """The whole model on this process's GPU (LOCAL_RANK under torchrun), else on the CPU."""
    return {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"


def check_4bit_support(device: str | None = None) -> None:
    """Quantize a tiny tensor with NF4 on the target device; say why 4-bit cannot run if it fails."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        bnb.functional.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16, device=device), quant_type="nf4")
    except Exception as exc:  # bitsandbytes fails in many ways on an unsupported platform
        raise ConfigError(f"4-bit loading needs bitsandbytes' NF4 kernels on {device}, which fail here "
                          f"({type(exc).__name__}: {exc}). Install a bitsandbytes build for this platform "
                          "(pip install 'bitsandbytes>=0.46'), or drop --4bit to train on a bf16 base.") from exc


def looks_like_path(name_or_path: str) -> bool:
    return os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)


def model_source(name_or_path: str | os.PathLike) -> str:
    """A hub name as it is, or a local model folder checked to exist and to hold a config.json.

    A `.gguf` file, or a folder holding exactly one `.gguf` and no config.json, becomes the model folder
    it converts to (dequantized, bf16; once, then cached: see `gguf_model_folder`).
    """
    name = str(name_or_path)
    if not looks_like_path(name):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"{option('model')} {name!r} does not exist: give a folder made by save_pretrained "
                          "(with config.json), a .gguf file or a hub name.")
    gguf = gguf_file(path)
    if gguf is not None:
        return str(gguf_model_folder(gguf))
    if not (path / "config.json").exists():
        raise ModelSourceError(f"{name!r} has no config.json (nor a .gguf file): it is not a transformers model "
                               "folder.")
    return str(path)


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only `.gguf` of a folder that has no config.json."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise ModelSourceError(f"{str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
                               "give the path of the one to load, e.g. --model " + str(found[0]))
    return found[0] if found else None


def gguf_cache_dir() -> Path:
    """Where converted GGUF files live: `$QLORAGA_CACHE/gguf`, by default `~/.cache/qloraga/gguf`."""
    return Path(os.environ.get("QLORAGA_CACHE") or "~/.cache/qloraga").expanduser() / "gguf"


def gguf_model_folder(file: str | os.PathLike) -> Path:
    """The model folder a GGUF file converts to, converting it the first time.

    The folder is named after the file's stem and a hash of its absolute path, size and mtime, so an
    edited or replaced file converts again. It is written to a temporary folder and renamed, under a
    lock, so an interrupted conversion leaves nothing and concurrent processes convert once.
    """
    file = Path(file).expanduser().resolve()
    stat = file.stat()
    key = hashlib.sha256(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = gguf_cache_dir() / f"{file.stem}-{key}"
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"Loading {str(file)!r} needs the gguf package for transformers' GGUF reader: "
                               "pip install 'gguf>=0.10,<1' (or pip install 'qloraga[real]').")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").exists():  # another process may have converted it meanwhile
            print(f"[qloraga] converting {file} to a transformers model folder (dequantized, bf16), once; "
                  f"cached in {target} (set QLORAGA_CACHE to move the cache)", file=sys.stderr)
            with atomic_dir(target) as tmp:
                convert_gguf(file, tmp)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, a concurrent conversion just does the work twice
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(file: Path, out: str | os.PathLike) -> None:
    """Dequantize a GGUF checkpoint with transformers' loader; save model and tokenizer to `out` (bf16)."""
    import transformers
    from transformers import AutoTokenizer, GgufConfig

    folder, name = str(file.parent), file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise ModelSourceError(f"transformers {transformers.__version__} cannot load the GGUF file {str(file)!r} "
                               f"({type(exc).__name__}: {exc}). Give the model's original transformers folder or "
                               "hub name instead (GGUF support depends on the architecture and the transformers "
                               "version).") from exc
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module | None:
    """The model's modules on the meta device (no weights, no memory), or None where that cannot be built."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an exotic architecture: callers fall back to the loaded model or to no size
        return None


def causal_lm_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, checked to describe a causal LM whose weight files are whole and whose quantization,
    if it was saved quantized, qloraga can train on (cheap: no weights are read)."""
    name = model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # transformers' words for a model_type it does not know, or remote code refused
        if trust_remote_code:
            raise ModelSourceError(f"--model {name_or_path}: transformers cannot read its config ({exc}).") from exc
        raise ModelSourceError(f"--trust-remote-code / trust_remote_code is off and transformers cannot read the "
                               f"config of --model {name_or_path} without it ({exc}): if the model ships its own "
                               "code and you trust it, pass --trust-remote-code.") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelSourceError(f"{name!r} is a {config.model_type!r} model, not a causal language model: qloraga "
                               "fine-tunes decoder-only LMs (those AutoModelForCausalLM loads).")
    if Path(name).is_dir():
        check_safetensors(Path(name))
    prequantized(config, name)
    return config


def check_safetensors(folder: Path) -> None:
    """Every safetensors file of a model folder holds the bytes its header promises, and every shard its index
    names is there: a download cut short is named here, not by a SafetensorError from deep inside the loader.
    Reads the headers only."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelSourceError(f"{index} is damaged (not a safetensors index with a weight_map): download or "
                                   "copy it again.") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelSourceError(f"{folder} is incomplete: {index.name} names {', '.join(missing)}, which "
                                   "is not there. Download or copy the missing shard(s).")
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ModelSourceError(f"{file} is damaged or incomplete ({problem}): download or copy it again.")


def safetensors_problem(file: Path) -> str | None:
    """What safetensors itself finds wrong with a file's header or length (it checks that the header's byte
    ranges cover the file exactly when it opens one, reading no tensor), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except SafetensorError as exc:
        return str(exc)


@dataclass(frozen=True)
class Prequantized:
    """A checkpoint saved already quantized by bitsandbytes (the `*-bnb-4bit` repos: its config.json holds the
    `quantization_config`). It is loaded as saved, never re-quantized. Its quantization type and storage are
    fixed by the stored weights; its compute dtype is not (bitsandbytes dequantizes to the input's dtype), so the
    run's `--dtype` sets it, as for a model qloraga quantizes itself."""

    quant_type: str  # nf4 or fp4
    double_quant: bool
    storage: str  # bnb_4bit_quant_storage
    compute_dtype: str  # the dtype the checkpoint's config names

    def describe(self, dtype: str) -> str:
        said = "" if self.compute_dtype == dtype else f" (the checkpoint says {self.compute_dtype}; --dtype sets it)"
        return (f"pre-quantized 4-bit {self.quant_type.upper()} checkpoint, loaded as saved (not re-quantized), "
                f"{dtype} compute{said}")


def prequantized(config: PretrainedConfig, name: str = "the model") -> Prequantized | None:
    """How the checkpoint `config` describes was saved quantized, or None for an unquantized one. 8-bit and other
    quantization methods are refused: the gradient-aligned init and the merged and GGUF exports read the
    dequantized weights of bitsandbytes' 4-bit layers."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ModelSourceError(f"{name} was saved quantized with {method!r}: qloraga fine-tunes unquantized "
                               "checkpoints (which it loads in 4-bit NF4 with --4bit) and bitsandbytes 4-bit ones. "
                               "Give the model's unquantized original.")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise ModelSourceError(f"{name} is a bitsandbytes 8-bit checkpoint, which qloraga does not fine-tune (its "
                               "init and exports read the dequantized weights of 4-bit layers). Give the model's "
                               "unquantized original (with --4bit for 4-bit NF4), or a bnb-4bit checkpoint.")
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        return None
    storage = q.get("bnb_4bit_quant_storage") or "uint8"
    return Prequantized(q.get("bnb_4bit_quant_type") or "fp4", bool(q.get("bnb_4bit_use_double_quant")),
                        str(storage).removeprefix("torch."),
                        str(q.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))


def check_quant_storage(found: Prequantized | None, quant_storage: torch.dtype | None) -> None:
    """A storage dtype asked for must be the pre-quantized checkpoint's own: its weights are stored that way."""
    if found is None or quant_storage is None:
        return
    asked = next((k for k, v in QUANT_STORAGE.items() if v == quant_storage), str(quant_storage))
    if asked != found.storage:
        raise ConfigError(f"{option('quant_storage')} {asked} contradicts the pre-quantized checkpoint, whose 4-bit "
                          f"weights are stored as {found.storage} (it is loaded as saved, not re-quantized): drop "
                          f"{option('quant_storage')}, or give the unquantized original to quantize it with --4bit.")


def weights_description(cfg: RunConfig, config: PretrainedConfig) -> str:
    """How a run's base is held, for its run line and dry run: pre-quantized, 4-bit NF4 by qloraga, or plain."""
    found = prequantized(config)
    if found is not None:
        return found.describe(cfg.dtype)
    return f"4-bit NF4, {cfg.dtype} compute" if cfg.load_in_4bit else cfg.dtype


def load_model(
    name_or_path: str | os.PathLike,
    load_in_4bit: bool = True,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    quant_storage: torch.dtype | None = None,
    **kwargs,
) -> PreTrainedModel:
    """Load a causal LM from a local path or a hub name, NF4 4-bit by default, bf16 otherwise.

    The bf16 model is never materialised in full on the accelerator: transformers quantizes
    tensor by tensor while loading. A checkpoint saved in 4-bit (`Prequantized`) is loaded as saved, whatever
    `load_in_4bit` says, computing in `dtype`. `quant_storage` (uint8 by default) must then be its own.
    """
    name = model_source(name_or_path)
    config = causal_lm_config(name, trust_remote_code)
    found = prequantized(config, name)
    check_quant_storage(found, quant_storage)
    if load_in_4bit or found is not None:
        check_4bit_support()
    quant = nf4_config(dtype, quant_storage or torch.uint8) if load_in_4bit and found is None else None
    if device_map is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        device_map = default_device_map()  # under FSDP, accelerate places the shards itself
    model = AutoModelForCausalLM.from_pretrained(
        name,
        config=config,
        quantization_config=quant,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if found is not None:
        compute_in(model, dtype)
    disable_cpu_repacking(model)
    return model


def compute_in(model: nn.Module, dtype: torch.dtype) -> None:
    """A pre-quantized model as if qloraga had quantized it with compute dtype `dtype`: its 4-bit layers compute in
    it and dequantize to it, and its unquantized weights (embeddings, norms, biases) are held in it. transformers
    keeps the checkpoint's dtypes, and a checkpoint quantized from bf16 weights dequantizes to bf16 in training's
    autograd path but not in bitsandbytes' fused inference kernel: one dtype makes both the same weights."""
    for module in model.modules():
        if is_4bit(module):
            module.compute_dtype = dtype
            module.weight.quant_state.dtype = dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and not isinstance(param, bnb.nn.Params4bit):
                param.data = param.data.to(dtype)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


def load_base(cfg: RunConfig, dtype: str | None = None) -> PreTrainedModel:
    """A run's base model exactly as its settings say (4-bit or not, compute dtype, quant storage,
    trust_remote_code): what `finetune` trains and what evaluate, export and chat load again from the run's
    config.yaml. `dtype` overrides the compute dtype."""
    return load_model(cfg.model, load_in_4bit=cfg.load_in_4bit, dtype=COMPUTE_DTYPES[dtype or cfg.dtype],
                      trust_remote_code=cfg.trust_remote_code, quant_storage=QUANT_STORAGE.get(cfg.quant_storage))


def is_4bit(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def unpack_cpu_weight(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU repacking of one `Linear4bit` weight; True if it was repacked.

    The inverse is a private bitsandbytes function, imported only where a repacked weight needs it, so a
    bitsandbytes build without it (one that never repacks) does not break `import qloraga`."""
    weight = module.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return True


def disable_cpu_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; undo any repacking done.

    Returns how many layers had to be unpacked (a warning says so: the unpacked absmax went
    through bf16, so those layers differ from the loaded ones by ~1e-3).
    """
    unpacked = 0
    for module in model.modules():
        if not is_4bit(module):
            continue
        module.support_avx512bf16_for_cpu = False
        unpacked += unpack_cpu_weight(module)
    if unpacked:
        warnings.warn(
            f"{unpacked} 4-bit layers had been repacked by bitsandbytes' CPU inference kernel (an eval "
            "forward before qloraga saw the model); they were unpacked, with ~1e-3 relative error. Load "
            "models with qloraga.load_model to avoid this.",
            stacklevel=2,
        )
    return unpacked


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear layer really computes with (dequantized for 4-bit), shape (out, in)."""
    if is_4bit(module):
        unpack_cpu_weight(module)
        return dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight
