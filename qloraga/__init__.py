"""qloraga: gradient-aligned (LoRA-GA, LoRA-One) fine-tuning of 4-bit (NF4) quantized causal LMs."""

import qloraga.noise  # noqa: F401  (first: filters third-party noise, some logged when bitsandbytes is imported)

# isort: split
from qloraga.adapters import get_qloraga_model
from qloraga.config import QLoraGAConfig
from qloraga.export import export_adapter, export_merged
from qloraga.init.factors import gora_factors, lora_ga_factors, lora_one_factors
from qloraga.integrations import restore_adapter_dtype
from qloraga.loading import load_model
from qloraga.optim import ScaledAdamW, ScaledSGD, scaled_optimizer

__all__ = ["QLoraGAConfig", "ScaledAdamW", "ScaledSGD", "export_adapter", "export_merged", "get_qloraga_model",
           "gora_factors", "load_model", "lora_ga_factors", "lora_one_factors", "restore_adapter_dtype",
           "scaled_optimizer"]
__version__ = "0.1.0"
