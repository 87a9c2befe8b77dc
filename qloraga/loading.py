"""Load a causal LM in 4-bit NF4 (or bf16), and keep bitsandbytes' CPU weight repacking out of the way.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight in place at its first
inference forward; afterwards `dequantize_4bit` returns wrong values and the forward has no autograd
kernel (docs/ALGORITHM.md section 6). Every model that passes through qloraga has that switched off.
The model's source and checks before loading are `model_source.py`'s (GGUF files: `gguf_convert.py`;
pre-quantized checkpoints: `prequantized.py`).
"""

from __future__ import annotations

import os
import warnings

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from qloraga.config import COMPUTE_DTYPES, QUANT_STORAGE, RunConfig
from qloraga.errors import ConfigError
from qloraga.model_source import causal_lm_config, model_source
from qloraga.prequantized import check_quant_storage, prequantized


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
