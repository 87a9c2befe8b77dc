"""`--dry-run`: what a run would do, without loading any weight: the resolved configuration, the data as it
will be trained on (statistics and two rendered examples with the trained span marked) and a memory estimate
of each phase, from the model's config alone (a meta-device skeleton gives every parameter's shape)."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

import torch
import yaml
from torch import nn
from transformers import AutoTokenizer

from qloraga.batches import IGNORE, pack, tokenize
from qloraga.config import ADAPTER_DTYPES, COMPUTE_DTYPES, RunConfig
from qloraga.formats import CHAT_FORMATS, prepare_tokenizer, render, resolve_format
from qloraga.init.chunks import (
    accumulator_bytes,
    activation_bytes,
    adapter_params,
    free_budget,
    held_floats,
    init_own_bytes,
    moment_bytes,
    plan_chunks,
    training_step_bytes,
)
from qloraga.memory import free_memory_bytes
from qloraga.model_source import model_skeleton, model_source
from qloraga.preflight import check_run
from qloraga.prequantized import prequantized, weights_description
from qloraga.presets import unique_parameters
from qloraga.recipe import resolve_demo
from qloraga.targets import find_target_layers

GiB = 2**30
MARK = ("⟦", "⟧")  # around the text the loss is taken on


@dataclass
class MemoryEstimate:
    """Bytes of each phase, estimated from parameter shapes and the run's sizes (activations: rough)."""

    weights: float
    init: float
    training: float
    chunks: int = 1

    def lines(self, cfg: RunConfig) -> list[str]:
        kind = f"4-bit NF4 + {cfg.dtype} rest" if cfg.load_in_4bit else cfg.dtype
        xtx = " and X^T X (--quant-error)" if cfg.lora_ga.quant_error != "off" else ""
        return [f"  weights ({kind}): {size(self.weights)}",
                f"  init (weights + a chunk's accumulators{xtx}, {self.chunks} chunk(s) at --init-memory-gb "
                f"{cfg.lora_ga.init_memory_gb}, + factors, SVD workspace and one checkpointed batch): "
                f"{size(self.init)}",
                f"  training step (weights + adapters, gradients, AdamW + activations): {size(self.training)}"]


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def quantized(skeleton: nn.Module) -> set[str]:
    """The linear layers transformers quantizes to 4 bits: all but the output embeddings (and what they tie)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(skeleton))
    return {n for n, m in skeleton.named_modules()
            if isinstance(m, nn.Linear) and not any(n == k or n.endswith("." + k) for k in keep)}


def weight_bytes(skeleton: nn.Module, cfg: RunConfig) -> float:
    """NF4 with double quantization: half a byte a weight plus one uint8 absmax per 64 (and an fp32 per 256
    of those); everything else in the compute dtype."""
    width = COMPUTE_DTYPES[cfg.dtype].itemsize
    four_bit = quantized(skeleton) if cfg.load_in_4bit else set()
    total = 0.0
    for full_name, p in unique_parameters(skeleton).items():  # a tied output embedding once
        name, _, pname = full_name.rpartition(".")
        n = p.numel()
        total += n * (0.5 + 1 / 64 + 4 / (64 * 256)) if name in four_bit and pname == "weight" else n * width
    return total


def estimate_memory(skeleton: nn.Module, cfg: RunConfig) -> MemoryEstimate:
    """Each phase from the model's config.json, with the init's and training's own memory model
    (`init/chunks.py`); the auto budget plans on this machine's free memory less the weights."""
    cuda = torch.cuda.is_available()
    width = COMPUTE_DTYPES[cfg.dtype].itemsize
    lora = cfg.lora_ga
    targets = find_target_layers(skeleton, lora.target_modules)
    weights = weight_bytes(skeleton, cfg)
    tokens = cfg.batch_size * cfg.seq_len
    checkpointed = activation_bytes(skeleton.config, tokens, width, checkpointing=True)
    activations = activation_bytes(skeleton.config, tokens, width, cfg.gradient_checkpointing)
    adapters = training_step_bytes(adapter_params(targets, lora.r), ADAPTER_DTYPES[lora.adapter_dtype].itemsize,
                                   moment_bytes(cfg.optim, cuda))
    fit = lora.quant_error != "off"  # X^T X beside each gradient, the fits' factors and workspace
    own = init_own_bytes(targets, lora.r, lora.svd_niter, held_floats(targets, lora), fit)
    budget = lora.init_memory_gb
    if budget == "auto":
        free = max(free_memory_bytes(torch.device("cuda" if cuda else "cpu")) - int(weights), 0)
        budget = free_budget(free, checkpointed, own).gb
    chunks = plan_chunks(skeleton, targets, init_memory_gb=budget, chunk_blocks=lora.chunk_blocks, covariance=fit)
    accumulators = max(sum(accumulator_bytes(targets[n], fit) for n in c) for c in chunks)
    return MemoryEstimate(weights, weights + accumulators + own + checkpointed, weights + adapters + activations,
                          len(chunks))


def marked(segments: list[tuple[str, bool]]) -> str:
    """The text with each trained span between MARK; adjacent trained segments share one span."""
    out, open_ = [], False
    for text, trained in segments:
        if trained != open_:
            out.append(MARK[0] if trained else MARK[1])
            open_ = trained
        out.append(text)
    return "".join(out) + (MARK[1] if open_ else "")


def dry_run(cfg: RunConfig, notes: list[str] = ()) -> None:
    """Print what `finetune(cfg)` would do and exit before any weight is loaded."""
    cfg = resolve_demo(cfg.validate())
    checked = check_run(cfg)
    print("[qloraga] dry run: nothing is loaded onto a device and nothing is written")
    for line in notes:
        print(f"[qloraga] {line}")
    for note in checked.notes:
        print(f"note: {note}")
    print(f"model: {cfg.model} ({weights_description(cfg, checked.model_config)})")
    print("resolved configuration:")
    print("  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  "))

    tokenizer = AutoTokenizer.from_pretrained(model_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
    for fix in prepare_tokenizer(tokenizer, cfg.chat_template):
        print(f"note: {fix}")
    fmt = resolve_format(checked.train_records, cfg.dataset_format)
    examples, report = tokenize(checked.train_records, cfg.dataset_format, tokenizer, cfg.seq_len)
    lengths = [len(e.input_ids) for e in examples]
    trained = sum(sum(label != IGNORE for label in e.labels) for e in examples)
    print(f"data ({fmt}): {len(checked.train_records)} training records -> {report.examples} examples "
          f"({report.truncated} truncated to --seq-len {cfg.seq_len}, {report.fully_masked} dropped with no response "
          f"token), {len(checked.eval_records)} held out")
    print(f"  tokens per example: min {min(lengths)}, mean {statistics.mean(lengths):.1f}, max {max(lengths)}; "
          f"{trained} of {sum(lengths)} tokens trained ({trained / sum(lengths):.0%})")
    if cfg.packing:
        print(f"  packing: {len(pack(examples, cfg.seq_len))} sequences of up to {cfg.seq_len} tokens")
    for i, record in enumerate(checked.train_records[:2]):
        print(f"example {i + 1} (the loss is taken on {MARK[0]}...{MARK[1]}):")
        segments = render(record, fmt, tokenizer)
        if fmt not in CHAT_FORMATS and tokenizer.eos_token:  # tokenize() closes these with a trained EOS
            segments.append((tokenizer.eos_token, True))
        print("  " + marked(segments).replace("\n", "\n  "))

    skeleton = model_skeleton(checked.model_config, cfg.trust_remote_code)
    if skeleton is None:
        print("memory estimate: not available (the model could not be built without weights)")
        return
    if prequantized(checked.model_config):  # held in 4-bit as if --4bit had quantized it
        cfg = dataclasses.replace(cfg, load_in_4bit=True)
    estimate = estimate_memory(skeleton, cfg)
    params = sum(p.numel() for p in unique_parameters(skeleton).values())
    print(f"memory estimate for {params / 1e6:.1f}M parameters, from config.json (the activations' share is an "
          "upper bound, see docs/memory.md):")
    print("\n".join(estimate.lines(cfg)))
