"""Third-party messages that tell a qloraga user nothing, filtered when qloraga is imported.

Only these exact messages are filtered, never a category or a whole library's log:
- bitsandbytes logs, on import on CPUs with AVX512-BF16, that the optional `kernels` package with its faster CPU
  4-bit kernel is missing; the fallback it uses then is the one qloraga wants (its CPU repacking is switched
  off anyway, see loading.py).
- PEFT reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, which warns
  about a name the user never wrote.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
PEFT_DEPRECATED_NAME = r"`is_gradient_checkpointing` is deprecated"


def drop_bnb_cpu_kernel_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(BNB_CPU_KERNEL)


def quiet_third_party() -> None:
    """Install the filters (idempotent); must run before bitsandbytes is first imported."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if drop_bnb_cpu_kernel_note not in logger.filters:
        logger.addFilter(drop_bnb_cpu_kernel_note)
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_NAME, category=FutureWarning)


quiet_third_party()
