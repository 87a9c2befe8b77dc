"""Wire LoRA-GA factors into PEFT's LoRA layers, with the frozen residual correction term.

Each target gets PEFT's LoRA adapter `"default"` (trainable `A`, `B`, initialised to `A0`, `B0`) and
the frozen buffers `qloraga_A0`, `qloraga_B0`. A PEFT `LoraVariant` makes the layer compute

    y = base(x) + s * [B, -B0] [A dropout(x); A0 x]  =  base(x) + s (B A dropout(x) - B0 A0 x)

as one rank-2r product, so the two terms cancel in fp32 before anything is rounded to bf16: at step 0
the model computes the quantized base (to ~1e-7), and it computes what the exported rank-2r adapter
computes. (Two adapters added one after the other round `base + s B A x` to bf16 first, which leaves
an error of ~1e-2; docs/ALGORITHM.md sections 2 and 6.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from qloraga.config import QLoraGAConfig, option
from qloraga.errors import ConfigError, DataError
from qloraga.init.factors import layer_generator
from qloraga.init.pipeline import Factors, initial_factors, plain_lora_factors
from qloraga.loading import disable_cpu_repacking, is_4bit
from qloraga.targets import find_target_layers

ADAPTER = "default"
# The adapter for the unquantized original weights of a --quant-error run (its fit left out), when a run's model
# is loaded with it beside ADAPTER for an export (`runs.load_run_model(original=True)`).
ORIGINAL = "original"
# The frozen correction's buffers on each corrected LoRA layer, and the prefix PEFT puts before module names.
A0_BUFFER, B0_BUFFER = "qloraga_A0", "qloraga_B0"
# The dtype qloraga gave a layer's trainable A, B (`adapter_dtype`), kept on the layer: a trainer's cast is undone.
DTYPE_ATTR = "qloraga_adapter_dtype"
# How many of the correction's last rows are the quantization-error fit (an attribute of the live layer): what an
# adapter for the unquantized original leaves out (`export.adapter`).
OFFSET_ROWS = "qloraga_offset_rows"
PEFT_PREFIX = "base_model.model."


def lora_config(r: int, lora_alpha: float, target_modules: list[str], lora_dropout: float = 0.0,
                **extra) -> LoraConfig:
    """The PEFT `LoraConfig` of every qloraga adapter (no bias, causal LM): training's and the exported one."""
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=lora_dropout,
                      bias="none", task_type="CAUSAL_LM", **extra)


def no_autocast(device: torch.device) -> AbstractContextManager:
    """A region where an enclosing autocast (TRL's and accelerate's `bf16=True`) does not recast matmuls to bf16:
    there `B A - B0 A0` would round A and A0, B and B0 to bf16 first, and a learned `B - B0` below bf16's
    resolution of B would cancel to noise. The device type is the tensors' ("cuda", "cpu"); one without autocast
    (meta) needs no region."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def delta_weight(layer: LoraLayer, adapter: str = ADAPTER) -> torch.Tensor:
    """The layer's adapter update in fp32, shape (out, in): `s (B A - B0 A0)` with the frozen correction,
    `s B A` without (LoRA-One, plain LoRA); in fp32 under any autocast too."""
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    with no_autocast(a.device):
        update = b @ a
        if hasattr(layer, A0_BUFFER):
            update = update - getattr(layer, B0_BUFFER).float() @ getattr(layer, A0_BUFFER).float()
    return layer.scaling[adapter] * update


class ResidualCorrection(LoraVariant):
    """PEFT LoRA variant: the adapter's output minus the frozen initial product `B0 A0`.

    PEFT calls these hooks and calls them private (they may change between releases):
    `tests/test_adapters.py` checks that PEFT still calls them, naming its version when it does not."""

    def supports_lora_conversion(self) -> bool:
        """False: PEFT's conversion to plain LoRA (`convert_to_lora`) would keep `B A` and silently drop the
        frozen `-B0 A0`. `qloraga.export_adapter` writes the equivalent rank-2r adapter instead."""
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:  # buffers come from attach_correction
        pass

    @staticmethod
    def delta_weight(module: LoraLayer, adapter: str) -> torch.Tensor:
        """`s * (B A - B0 A0)` in fp32, shape (out, in)."""
        return delta_weight(module, adapter)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = ResidualCorrection.delta_weight(module, active_adapter)
        return (orig_weight.float() + delta).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data.copy_(ResidualCorrection.merge_safe(module, active_adapter, orig_weight))

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = ResidualCorrection.delta_weight(module, active_adapter)
        return (orig_weight.float() - delta).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        a0, b0 = getattr(module, A0_BUFFER), getattr(module, B0_BUFFER)
        # One rank-2r product [B, -B0] [A dropout(x); A0 x]: the two terms cancel inside the matmul's
        # fp32 accumulation, before any rounding to bf16, exactly as the exported adapter computes. In the
        # correction's dtype whatever autocast encloses the model (`no_autocast`), and whatever dtype a trainer
        # cast the trainable A, B to.
        dtype = a0.dtype
        a, b = lora_a.weight.to(dtype), lora_b.weight.to(dtype)
        dropout = module.lora_dropout[active_adapter]
        with no_autocast(x.device):
            x = x.to(dtype)
            if isinstance(dropout, nn.Identity):  # one matmul with [A; A0] reads x once, forward and backward
                h = F.linear(x, torch.cat([a, a0]))
            else:
                h = torch.cat([F.linear(dropout(x), a), F.linear(x, a0)], dim=-1)
            delta = F.linear(h, torch.cat([b, -b0], dim=1))
        return result + (delta * module.scaling[active_adapter]).to(result.dtype)


def set_adapter_dtype(layer: LoraLayer, dtype: torch.dtype) -> None:
    """The trainable A, B in `dtype`, and `dtype` recorded on the layer (`restore_adapter_dtype` reads it)."""
    layer.lora_A[ADAPTER].to(dtype)
    layer.lora_B[ADAPTER].to(dtype)
    setattr(layer, DTYPE_ATTR, dtype)


def start_adapter(layer: LoraLayer, a0: torch.Tensor, b0: torch.Tensor, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the trainable adapter to (A0, B0) in `dtype`; returns the values as set."""
    device = layer.lora_A[ADAPTER].weight.device
    a0, b0 = a0.to(device=device, dtype=dtype), b0.to(device=device, dtype=dtype)
    set_adapter_dtype(layer, dtype)
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.copy_(a0)
        layer.lora_B[ADAPTER].weight.copy_(b0)
    return a0, b0


def attach_correction(layer: LoraLayer, a0: torch.Tensor, b0: torch.Tensor, dtype: torch.dtype,
                      offset: tuple[torch.Tensor, torch.Tensor] | None = None, cancel: bool = True) -> None:
    """Start the trainable adapter at (A0, B0); the frozen buffers keep the same bits (`cancel`: LoRA-GA's
    correction, step 0 = the base) and/or `offset = (A_e, B_e)`, a frozen start the layer adds (the
    quantization-error fit): buffers `[A0; A_e]`, `[B0, -B_e]`, so the layer computes
    `s (B A - B0 A0 + B_e A_e)`, and the export's fold stays the one `[A; A0], [B, -B0]`."""
    a0, b0 = start_adapter(layer, a0, b0, dtype)
    frozen_a, frozen_b = ([a0.clone()], [b0.clone()]) if cancel else ([], [])
    if offset is not None:
        frozen_a.append(offset[0].to(a0))
        frozen_b.append(-offset[1].to(b0))
    layer.register_buffer(A0_BUFFER, torch.cat(frozen_a))
    layer.register_buffer(B0_BUFFER, torch.cat(frozen_b, dim=1))
    setattr(layer, OFFSET_ROWS, 0 if offset is None else offset[0].shape[0])
    layer.lora_variant[ADAPTER] = ResidualCorrection()


def corrected_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of `model` that carries a qloraga correction, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, A0_BUFFER)}


def start_values(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The frozen copy of the adapter's start (A0, B0) a corrected layer keeps in its buffers, before any
    quantization-error offset rows; None without one (no correction, or the offset alone)."""
    if not hasattr(layer, A0_BUFFER):
        return None
    rows = getattr(layer, A0_BUFFER).shape[0] - getattr(layer, OFFSET_ROWS, 0)
    return (getattr(layer, A0_BUFFER)[:rows], getattr(layer, B0_BUFFER)[:, :rows]) if rows else None


def has_error_fit(model: nn.Module) -> bool:
    """Whether `model` carries a quantization-error fit: a live layer's offset rows, or the original's adapter
    loaded beside the run's."""
    if ORIGINAL in getattr(model, "peft_config", {}):
        return True
    return any(getattr(layer, OFFSET_ROWS, 0) for layer in corrected_layers(model).values())


def wired_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer whose adapter qloraga wired (any init, corrected or not), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, DTYPE_ATTR)}


def check_batches(batches: Iterable[dict]) -> None:
    if isinstance(batches, Sized) and len(batches) == 0:
        raise DataError("batches is empty: LoRA-GA needs at least one batch (a dict with input_ids, "
                        "attention_mask and labels) to estimate the gradient.")
    if iter(batches) is batches:
        raise ValueError("batches must be re-iterable (a list or a DataLoader), not an iterator: each "
                         "chunk of decoder blocks makes one pass over it.")


def check_target_rank(targets: dict[str, nn.Linear], r: int, directions: int) -> None:
    """`directions` singular directions (2r for LoRA-GA, r for LoRA-One or plain LoRA) must fit every target."""
    smallest = min(min(m.out_features, m.in_features) for m in targets.values())
    if directions > smallest:
        name = min(targets, key=lambda n: min(targets[n].out_features, targets[n].in_features))
        raise ConfigError(f"r={r} is too large: the init uses {directions} singular directions and the smallest "
                          f"target dimension is {smallest} ({name}). Use r <= {smallest * r // directions}.")


def rank_patterns(ranks: dict[str, int], r: int, scaling: float, factor: int = 1) -> dict[str, dict]:
    r"""PEFT's `rank_pattern` and `alpha_pattern` for the layers whose rank is not `r` (full module names, which
    PEFT matches as `(.*\.)?name$`), each at the same scaling `s = alpha / rank` as the others; `factor` 2 for
    the rank-2r export of a corrected adapter. Empty for uniform ranks."""
    other = {n: k for n, k in sorted(ranks.items()) if k != r}
    if not other:
        return {}
    return {"rank_pattern": {n: factor * k for n, k in other.items()},
            "alpha_pattern": {n: factor * scaling * k for n, k in other.items()}}


def wire_adapters(model: nn.Module, factors: Factors, config: QLoraGAConfig, offsets: Factors | None = None
                  ) -> PeftModel:
    """A PEFT model whose adapter "default" starts at the given factors (per-layer ranks from their shapes):
    with the frozen correction for LoRA-GA (step 0 = the base), without it for LoRA-One and GoRA (step 0 =
    the base plus the initial product). `offsets` (the quantization-error fit) are frozen starts added on top
    of either (`attach_correction`)."""
    ranks = {n: a0.shape[0] for n, (a0, _) in factors.items()}
    peft_config = lora_config(config.r, config.lora_alpha, sorted(factors), config.lora_dropout,
                              **rank_patterns(ranks, config.r, config.scaling))
    peft_model = get_peft_model(model, peft_config, adapter_name=ADAPTER, autocast_adapter_dtype=False)
    base = peft_model.get_base_model()
    for name, (a0, b0) in factors.items():
        offset = (offsets or {}).get(name)
        if config.method == "lora-ga" or offset is not None:
            attach_correction(base.get_submodule(name), a0, b0, config.torch_adapter_dtype, offset,
                              cancel=config.method == "lora-ga")
        else:
            start_adapter(base.get_submodule(name), a0, b0, config.torch_adapter_dtype)
    return peft_model


def get_qloraga_model(model: nn.Module, config: QLoraGAConfig, batches: Iterable[dict], *,
                      originals: Callable[[str], torch.Tensor] | None = None, step: bool = True) -> PeftModel:
    """LoRA-GA (or LoRA-One or GoRA, `config.method`) on `model` (4-bit or not): estimate the gradient on
    `batches`, factorise (at per-layer ranks under `rank_allocation: gradient`), wire PEFT adapters.

    `batches` is re-iterable (list or DataLoader) of dicts with `input_ids`, `attention_mask`, `labels`.
    With LoRA-GA the returned model computes exactly what `model` computed, until it is trained; with
    LoRA-One it starts one scaled rank-r gradient step away. Its `qloraga_report` attribute says how the
    initialisation went. With `config.quant_error` on, every layer also carries the frozen rank-r fit of its
    quantization error, on top of that start (`originals(name)`: the unquantized weight of a layer, by default
    read from the checkpoint the model was loaded from). `step=False` (with the fit only): the trainable start is
    PEFT's plain LoRA (Kaiming A, B = 0) instead of the method's, so step 0 is the base plus the fit alone.
    """
    config.validate()
    check_batches(batches)
    targets = find_target_layers(model, config.target_modules)
    check_target_rank(targets, config.r, 2 * config.r if config.method == "lora-ga" else config.r)
    check_quant_error(targets, config)
    disable_cpu_repacking(model)
    offsets = {} if config.quant_error != "off" else None
    factors, report = initial_factors(model, targets, batches, config, offsets=offsets, originals=originals)
    if not step:
        if offsets is None:
            raise ConfigError(f"step=False starts plain LoRA on the quantization-error fit: set "
                              f"{option('lora_ga.quant_error')} (e.g. activation).")
        factors = {n: tuple(t.to(targets[n].weight.device) for t in plain_lora_factors(
            targets[n].out_features, targets[n].in_features, config.r, layer_generator(config.seed, n)))
            for n in factors}
        report.method = "lora"
    peft_model = wire_adapters(model, factors, config, offsets)
    peft_model.qloraga_report = report
    return peft_model


def check_quant_error(targets: dict[str, nn.Linear], config: QLoraGAConfig) -> None:
    """The quantization-error fit needs 4-bit layers (a bf16 base has no error to fit)."""
    if config.quant_error != "off" and not any(is_4bit(m) for m in targets.values()):
        raise ConfigError(f"{option('lora_ga.quant_error')} {config.quant_error} fits the 4-bit weights' "
                          "quantization error, and this model's target layers are not 4-bit: load it with --4bit "
                          f"(load_in_4bit=True), or set {option('lora_ga.quant_error')} off.")


def get_lora_model(model: nn.Module, config: QLoraGAConfig) -> PeftModel:
    """Plain LoRA (PEFT's default init, B=0) on the same targets: the baseline LoRA-GA is compared with."""
    config.validate()
    targets = find_target_layers(model, config.target_modules)
    check_target_rank(targets, config.r, config.r)
    disable_cpu_repacking(model)
    peft_config = lora_config(config.r, config.lora_alpha, sorted(targets), config.lora_dropout)
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, peft_config, adapter_name=ADAPTER, autocast_adapter_dtype=False)
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            set_adapter_dtype(layer, config.torch_adapter_dtype)
    return peft_model
