"""Load a causal LM in 4-bit NF4 (or bf16), and keep bitsandbytes' CPU weight repacking out of the way.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight in place at its first
inference forward; afterwards `dequantize_4bit` returns wrong values and the forward has no autograd
kernel (docs/ALGORITHM.md section 6). Every model that passes through qloraga has that switched off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import warnings
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


def causal_lm_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config, checked to describe a causal LM (cheap: no weights are read)."""
    name = model_source(name_or_path)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelSourceError(f"{name!r} is a {config.model_type!r} model, not a causal language model: qloraga "
                               "fine-tunes decoder-only LMs (those AutoModelForCausalLM loads).")
    return config


def load_model(
    name_or_path: str | os.PathLike,
    load_in_4bit: bool = True,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    **kwargs,
) -> PreTrainedModel:
    """Load a causal LM from a local path or a hub name, NF4 4-bit by default, bf16 otherwise.

    The bf16 model is never materialised in full on the accelerator: transformers quantizes
    tensor by tensor while loading.
    """
    name = model_source(name_or_path)
    config = causal_lm_config(name, trust_remote_code)
    if load_in_4bit:
        check_4bit_support()
    quant = nf4_config(dtype, quant_storage) if load_in_4bit else None
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
    disable_cpu_repacking(model)
    return model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


def load_base(cfg: RunConfig, dtype: str | None = None) -> PreTrainedModel:
    """A run's base model exactly as its settings say (4-bit or not, compute dtype, quant storage,
    trust_remote_code): what `finetune` trains and what evaluate, export and chat load again from the run's
    config.yaml. `dtype` overrides the compute dtype."""
    return load_model(cfg.model, load_in_4bit=cfg.load_in_4bit, dtype=COMPUTE_DTYPES[dtype or cfg.dtype],
                      trust_remote_code=cfg.trust_remote_code, quant_storage=QUANT_STORAGE[cfg.quant_storage])


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
