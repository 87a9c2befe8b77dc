"""Benchmark 3: training throughput of qloraga (with its residual correction) against plain PEFT QLoRA.

Same 4-bit model, rank, target layers, batch and optimizer. Each qloraga model is paired with a plain
QLoRA model whose adapters have the same dtype: fp32 (PEFT's default `autocast_adapter_dtype`) and bf16
(qloraga's default `adapter_dtype`). All four models live in one process and take turns, a few steps
each, in a rotated order; the ratio qloraga / plain tokens/s is taken per round. Goal: ratio >= 0.95.
Every model trains through the library's own Trainer (`common.library_trainer`: what `qloraga finetune` runs,
its optimizer, clipping and callbacks); a step's seconds are those `Trainer.train` spends between the step's
start and end (the batch fetch before it and the checkpoint after the last one are outside).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import common
import torch

CONFIGS = {  # name: (method, adapter dtype)
    "plain QLoRA, fp32 adapters": ("plain", "float32"),
    "qloraga, fp32 adapters": ("qloraga", "float32"),
    "plain QLoRA, bf16 adapters": ("plain", "bfloat16"),
    "qloraga, bf16 adapters (default)": ("qloraga", "bfloat16"),
}
PAIRS = [("qloraga, fp32 adapters", "plain QLoRA, fp32 adapters"),
         ("qloraga, bf16 adapters (default)", "plain QLoRA, bf16 adapters")]


def build(name: str, path: str, batches: list[dict], r: int, dtype: torch.dtype, svd_niter: int | None):
    """The model of configuration `name` (qloraga's init on `batches`), and the library's Trainer on it."""
    method, adapter_dtype = CONFIGS[name]
    model = common.load(path, four_bit=True, dtype=dtype)
    if method == "plain":
        model = common.plain_lora_model(model, r=r, adapter_dtype=adapter_dtype)
    else:
        model = common.qloraga_model(model, batches, r=r, adapter_dtype=adapter_dtype, svd_niter=svd_niter)
    return model, common.library_trainer(model, batches, lr=1e-5)


def time_rounds(models: dict[str, tuple], batches: list[dict], repeats: int, steps: int,
                contexts: dict[str, Callable[[], AbstractContextManager]] | None = None) -> list[dict[str, float]]:
    """Seconds per step of each (model, trainer) on `batches`, `steps` steps each round through the library's
    Trainer, in an order rotated every round, after one warm-up step each (lazy set-up, optimizer state);
    `contexts[name]()` is entered around the steps of `name` where given."""
    contexts = contexts or {}

    def steps_of(name: str, count: int, new_batches: list[dict] | None = None) -> float:
        _, trainer = models[name]
        with contexts.get(name, contextlib.nullcontext)():
            return sum(common.train_steps(trainer, count, new_batches)) / count

    for name in models:
        steps_of(name, 1, batches)
    rounds = []
    for i in range(repeats):
        seconds = {name: steps_of(name, steps) for name in common.rotated(list(models), i)}
        rounds.append(seconds)
        print(f"round {i + 1}/{repeats}: " + ", ".join(f"{k} {v:.3f}s/step" for k, v in seconds.items()), flush=True)
    return rounds


def rate_rows(rounds: list[dict[str, float]], tokens: int) -> list[dict]:
    """Per configuration: median seconds per step and tokens per second over the rounds."""
    return [{"config": name, "s/step": common.median([r[name] for r in rounds]),
             "tokens/s": common.median([tokens / r[name] for r in rounds])} for name in rounds[0]]


def ratio_rows(rounds: list[dict[str, float]], pairs: list[tuple[str, str]], goal: float) -> list[dict]:
    """Per (ours, plain) pair: the median over rounds of the round's tokens/s ratio ours / plain."""
    rows = []
    for ours, plain in pairs:
        ratio = common.median([r[plain] / r[ours] for r in rounds])
        rows.append({"ratio": f"{ours} / {plain}", "tokens/s ratio": ratio, "goal": f">= {goal}",
                     "met": ratio >= goal})
    return rows


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=list(common.SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype of the base")
    p.add_argument("--svd-niter", type=int, default=None,
                   help="randomized SVD in qloraga's init (a GPU's exact SVD takes ~1 s per 4096-wide layer)")
    p.set_defaults(repeats=5)
    args = p.parse_args()
    if args.tiny:
        args.shape, args.layers, args.repeats, args.seq_len, args.r, args.steps = "tiny", 2, 2, 8, 2, 1
    common.setup_child()
    dtype = getattr(torch, args.dtype)
    config = common.llama_config(args.shape, args.layers)
    path = str(common.random_model(args.shape, args.layers))
    batches = common.random_batches(4, args.batch_size, args.seq_len, config.vocab_size, seed=1)
    models = {name: build(name, path, batches, args.r, dtype, args.svd_niter) for name in CONFIGS}
    rounds = time_rounds(models, batches, args.repeats, args.steps)
    tokens = args.batch_size * args.seq_len
    rows = rate_rows(rounds, tokens)
    ratios = ratio_rows(rounds, PAIRS, 0.95)
    params = common.count_params(config)
    print(f"\nShape {args.shape}, {args.layers} layers ({params['total'] / 1e6:.1f}M parameters), r={args.r}, "
          f"batch {args.batch_size}x{args.seq_len} tokens, {args.dtype} compute, {args.steps} steps per round, "
          f"median of {args.repeats} rounds:\n")
    print(common.table(rows, list(rows[0])))
    print()
    print(common.table(ratios, list(ratios[0])))
    suffix = ("_tiny" if args.tiny else "") + ("" if args.dtype == "bfloat16" else f"_{args.dtype}")
    payload = {"shape": args.shape, "layers": args.layers, "params": params, "r": args.r,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype, "steps": args.steps,
               "repeats": args.repeats, "rounds": rounds, "rows": rows, "ratios": ratios}
    print(f"\nwrote {common.save(args.out, 'throughput' + suffix, payload)}")


if __name__ == "__main__":
    main()
