"""Command line: flags -> `RunConfig` (defaults < preset < --config file < flags) -> `recipe.finetune`."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Any

from qloraga.config import INITS, LORA_GA_FLAGS, REPORT_TO, RunConfig, gib_or_auto, merge_settings
from qloraga.presets import (
    SAFE_DEFAULTS,
    available_presets,
    detect_preset,
    load_preset,
    load_yaml,
    unknown_family_note,
)

# What a user can cause and fix: reported as one paragraph, no traceback (QLORAGA_DEBUG=1 shows it).
USER_ERRORS = (ValueError, OSError, FloatingPointError, MemoryError)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a causal LM with LoRA-GA adapters on a 4-bit (--4bit) or bf16 base. With no "
                    "argument: the embedded demo (tiny model, arithmetic word problems), on any machine.",
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    add("--config", help="YAML file of settings, applied over the preset (flags override it)")
    add("--model", help="local model folder or hub name (default: the embedded demo model)")
    add("--preset", help=f"model family preset ({', '.join(available_presets())}) or a YAML path; "
                         "default: detected from the model's model_type")
    add("--dataset", help="JSON/JSONL/CSV/Parquet file or hub dataset NAME[:CONFIG] (default: the demo data)")
    add("--dataset-split", help="split of a hub --dataset to train on (default: train)")
    add("--eval-dataset", help="held-out file or hub NAME[:CONFIG]; default: --eval-split of --dataset")
    add("--eval-dataset-split", help="split of a hub --eval-dataset, or without one the split of the hub "
                                     "--dataset held out (e.g. validation) instead of --eval-split")
    add("--dataset-format", choices=["auto", "alpaca", "messages", "prompt-completion", "sharegpt", "text"],
        help="record format (auto: from the fields)")
    add("--output-dir", help="where outputs go (default: runs/<model>-<time>)")
    add("--4bit", dest="load_in_4bit", action="store_true", help="load the base in 4-bit NF4 (QLoRA); else bf16")
    add("--dtype", choices=["bfloat16", "float32"],
        help="compute dtype (bf16 default; float32 on CPUs without bf16 kernels, as the demo preset does)")
    add("--quant-storage", choices=["uint8", "bfloat16", "float32"],
        help="storage dtype of 4-bit weights (bfloat16 for FSDP, see configs/accelerate/)")
    add("--rank", type=int, help="LoRA rank r (the exported adapter has rank 2r)")
    add("--alpha", type=float, help="LoRA alpha (scaling alpha/r)")
    add("--direction", help="LoRA-GA direction: ArB2r, A2rBr, ArBr or random")
    add("--init", choices=list(INITS),
        help="adapter initialisation: lora-ga (step 0 = the base, through a frozen correction), lora-one (top-r "
             "of -G, no correction: step 0 carries a scaled gradient step) or lora (plain B=0)")
    add("--estimator", choices=["exact", "sketch"],
        help="gradient estimator: exact (chunked fp32 G) or sketch (one streaming pass, QLoRA-step memory)")
    add("--power-iters", type=int, help="sketch estimator: extra passes over the gradient batches")
    add("--oversample", type=int, help="sketch estimator: sketch width beyond 2r")
    add("--ga-batches", type=int, help="training batches used to estimate the gradient for LoRA-GA")
    add("--init-memory-gb", type=gib_or_auto, help="memory budget (GiB) of the gradient accumulators of one chunk, "
        "or auto (default): from the free memory and the projected training step")
    add("--max-steps", type=int, help="optimizer steps (overrides --epochs when > 0)")
    add("--epochs", type=float, help="passes over the training data")
    add("--lr", type=float, help="peak learning rate (LoRA-GA wants a full fine-tuning one)")
    add("--batch-size", type=int, help="sequences per device batch")
    add("--grad-accum", type=int, help="batches accumulated per optimizer step")
    add("--seq-len", type=int, help="maximum tokens per sequence (longer samples are truncated)")
    add("--packing", action="store_true", help="join several samples into each sequence (each still attends "
                                               "only to itself)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations")
    add("--optim", help="optimizer: scaled_adamw or scaled_sgd (Riemannian-preconditioned LoRA factors), or a "
                        "transformers name (auto: paged 8-bit AdamW on GPU, AdamW on CPU)")
    add("--save-steps", type=int, help="write a checkpoint every N optimizer steps")
    add("--logging-steps", type=int, help="log the training loss every N optimizer steps")
    add("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    add("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    add("--seed", type=int, help="random seed of data order, dropout and init")
    add("--eval-split", type=float, help="fraction of --dataset held out when no --eval-dataset is given")
    add("--eval-steps", type=int, help="held-out loss every N optimizer steps during training (0: only before "
                                       "and after)")
    add("--eval-samples", type=int, help="held-out samples scored by exact match before and after training, on "
                                         "short-answer prompt-completion/alpaca data (0: off)")
    add("--report-to", choices=list(REPORT_TO), help="where the Trainer also logs: tensorboard, wandb, none (auto: "
                                                     "tensorboard if installed); metrics.jsonl is always written")
    add("--merge", action="store_true", help="also write a merged bf16 model")
    add("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    add("--dry-run", action="store_true", help="print the resolved configuration, data statistics, two rendered "
                                               "examples and a memory estimate, then exit without loading weights")
    return p


def model_type(model: str) -> str | None:
    """The model's `model_type`, read from its config without loading weights."""
    from transformers import AutoConfig

    from qloraga.loading import model_source

    try:
        return AutoConfig.from_pretrained(model_source(model)).model_type  # a .gguf: its converted folder
    except (OSError, ValueError):
        return None


def resolve(args: dict[str, Any]) -> RunConfig:
    """Merge defaults, preset, --config file and flags into one validated `RunConfig`."""
    flags = {k: v for k, v in args.items() if k not in LORA_GA_FLAGS and k != "config"}
    flags["lora_ga"] = {LORA_GA_FLAGS[k]: v for k, v in args.items() if k in LORA_GA_FLAGS}
    file_settings = load_yaml(args["config"]) if "config" in args else {}
    model = flags.get("model", file_settings.get("model", RunConfig.model))
    preset = flags.get("preset", file_settings.get("preset"))
    settings = RunConfig().to_dict()
    if preset is None:
        family = None if model == "demo" else model_type(model)
        preset = "demo" if model == "demo" else detect_preset(family)
        if preset is None:
            print(f"[qloraga] note: {unknown_family_note(model, family)}", file=sys.stderr)
            settings = merge_settings(settings, SAFE_DEFAULTS)
    if preset:
        settings = merge_settings(settings, load_preset(preset))
    settings = merge_settings(merge_settings(settings, file_settings), flags)
    settings["preset"] = preset
    return RunConfig.from_dict(settings)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = parser()
    if prog:  # `qloraga finetune` rather than the script's name
        p.prog = prog
    args = vars(p.parse_args(argv))
    dry = args.pop("dry_run", False)
    from qloraga.recipe import finetune  # heavy imports after --help

    try:
        if dry:
            from qloraga.dryrun import dry_run

            dry_run(resolve(args))
        else:
            finetune(resolve(args))
    except pickle.UnpicklingError as exc:
        print(f"error: refused to load a checkpoint file that is not plain tensors ({exc}). Checkpoints are only "
              "loaded with torch.load(weights_only=True); delete the suspicious checkpoint folder.", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        if os.environ.get("QLORAGA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted{f' ({exc})' if str(exc) else ''}: rerun the same command with --resume to "
              "continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
