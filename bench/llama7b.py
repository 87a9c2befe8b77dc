"""Benchmark 5: Llama-2-7B on a consumer budget: every phase of a LoRA-GA QLoRA run under 16 GiB.

Builds a Llama-2-7B-shaped model (the real config, random weights), runs the LoRA-GA initialisation (64
samples x 1024 tokens, r=16, every linear layer of the blocks) and 20 training steps (batch 1, 1024 tokens,
gradient checkpointing, paged 8-bit AdamW on a GPU) through the library's own Trainer (`common.library_trainer`,
what `qloraga finetune` runs), and reports the peak memory of each phase and the init time.

How the model is built without a 14 GB bf16 copy: random bf16 shards are written to disk one decoder block
at a time (peak: one block, ~0.4 GB), then loaded through `qloraga.load_model`, which quantizes tensor by
tensor as it loads, exactly as a user's real checkpoint would be. On a GPU, peaks are
`torch.cuda.max_memory_allocated` per phase; on a CPU, the process's VmHWM per phase (`--shape`/`--layers`
make it small enough), printed beside an analytic projection of the same phases, which is also printed
for the 7B shape: on a CPU that is a projection, not a measurement.
"""

from __future__ import annotations

import time

import common
import torch

GOAL_GIB = 16.0


def projection(config, seq_len: int, r: int, init_memory_gb: float, chunk_blocks: int | None,
               checkpointing: bool = True) -> dict[str, dict]:
    """Analytic GPU memory (GiB) of each phase, by component: the weights, plus what the phase adds.

    NF4 with double quantization: 0.5 byte per weight plus ~1/64 byte of absmax; embeddings, head, norms bf16.
    Init (exact estimator): the fp32 accumulators of one chunk; the activations a backward to the chunk's first
    block keeps: without checkpointing every block's (a `Linear4bit` saves no input, so per token and block
    about 36 h + 6 i bytes: fp32 norms, RoPE, attention, SiLU and product), with it the block inputs, one
    block recomputed and the chunk's target inputs the hooks hold (2 (3 h + i) bytes per token and block);
    3 fp32 copies of the logits, and the exact SVD of the largest layer (U, S, Vt in fp32).
    Train: LoRA weights, grads (fp32) and two 8-bit Adam states; the checkpointed block inputs; one block's
    activations during its recompute, with the inputs the 7 LoRA layers save; 3 fp32 copies of the logits.
    """
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    params = common.count_params(config)
    linear = params["block_linear"]
    per_block = linear / layers
    blocks = chunk_blocks or max(1, int(init_memory_gb * 2**30 // (4 * per_block)))
    lora = r * layers * sum(o + n for o, n in [(h, h)] * 4 + [(i, h)] * 3)  # A (r x in) and B (out x r), 7 targets
    block_act = 36 * h + 6 * i
    weights = {"NF4 block linears": linear * (0.5 + 1 / 64),
               "bf16 embeddings, head, norms": 2 * (params["total"] - linear)}
    chunk = min(blocks, layers)
    activations = {"checkpointed block inputs": seq_len * layers * 2 * h,
                   "one block recomputed": seq_len * block_act,
                   "chunk's target inputs held by the hooks": seq_len * chunk * 2 * (3 * h + i)} if checkpointing \
        else {"activations (all blocks, no checkpointing)": seq_len * layers * block_act}
    init = {"fp32 accumulators (one chunk)": 4 * per_block * chunk, **activations,
            "fp32 logits x3": 3 * 4 * seq_len * vocab, "exact SVD of the largest layer": 4 * (i * h + 2 * h * h)}
    train = {"LoRA weights + grads (fp32) + 8-bit Adam": lora * (4 + 4 + 2),
             "checkpointed block inputs": seq_len * layers * 2 * h,
             "one block recomputed (+ LoRA inputs)": seq_len * (block_act + 2 * (5 * h + 2 * i)),
             "fp32 logits x3": 3 * 4 * seq_len * vocab}
    gib = 2**30
    out = {"load": {k: v / gib for k, v in weights.items()}}
    out["init"] = {**out["load"], **{k: v / gib for k, v in init.items()}}
    out["train"] = {**out["load"], **{k: v / gib for k, v in train.items()}}
    return out


def svd_seconds(config, device: str = "cuda", repeats: int = 1) -> dict[str, dict[str, float]]:
    """Seconds of one layer's exact SVD (the library default) and of the randomized one (niter=4, rank 32) on
    this device, per distinct target shape: what the SVD step of the init costs, without running it again."""
    def timed(fn) -> float:
        return common.median([common.timed(fn) for _ in range(repeats)])

    small = torch.randn(256, 256, device=device)
    torch.linalg.svd(small), torch.svd_lowrank(small, q=32, niter=4)  # solver handles and kernels loaded
    h, i = config.hidden_size, config.intermediate_size
    out = {}
    for rows, cols in [(h, h), (i, h), (h, i)]:
        g = torch.randn(rows, cols, device=device)
        out[f"{rows}x{cols}"] = {"exact": timed(lambda g=g: torch.linalg.svd(g, full_matrices=False)),
                                 "randomized niter=4": timed(lambda g=g: torch.svd_lowrank(g, q=32, niter=4))}
    print(f"svd seconds per layer: {out}", flush=True)
    return out


def load_phase(path) -> tuple[torch.nn.Module, dict]:
    """The 4-bit model and the load's memory and time (on a CPU, copied out of the file mapping)."""

    def load():
        model = common.load(path, four_bit=True)
        common.materialize(model)  # no-op on a GPU; on a CPU, the unquantized tensors leave the file mapping
        return model

    return common.measure(load)


def train_phase(model: torch.nn.Module, batches: list[dict], checkpointing: bool = True, lr: float = 2e-5) -> dict:
    """Training steps as a 7B QLoRA run takes them, one per batch, through the library's Trainer with its
    defaults (gradient checkpointing; `optim` auto: paged 8-bit AdamW on a GPU, AdamW on a CPU): memory and time
    of the phase (the Trainer's set-up and its checkpoint at the end included), seconds per step (the first, with
    its lazy set-up, and the median of the others), losses."""
    trainer = common.library_trainer(model, batches, lr=lr, gradient_checkpointing=checkpointing)
    step_seconds, stats = common.measure(lambda: common.train_steps(trainer, len(batches)))
    return {**stats, "seconds per step": sum(step_seconds) / len(batches), "first step s": step_seconds[0],
            "later steps median s": common.median(step_seconds[1:]), "losses": trainer.step_timer.losses}


def total(components: dict[str, float]) -> float:
    return sum(components.values())


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=list(common.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="another depth (a CPU-scale run)")
    p.add_argument("--samples", type=int, default=64, help="gradient samples, one per batch")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--init-memory-gb", type=float, default=4.0)
    p.add_argument("--chunk-blocks", type=int, default=None)
    p.add_argument("--estimator", default="exact", choices=["exact", "sketch"],
                   help="qloraga's gradient estimator (the projection models the exact one)")
    p.add_argument("--svd-niter", type=int, default=None,
                   help="randomized SVD with this many power iterations (PEFT's and the reference code's choice: 4) "
                        "instead of the library's exact SVD")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    p.add_argument("--no-init-checkpointing", action="store_true",
                   help="initialise without activation checkpointing (the library's default is on)")
    args = p.parse_args()
    if args.tiny:
        args.shape, args.samples, args.seq_len, args.steps = "tiny", 2, 16, 2
    else:
        common.reexec_with_malloc_env()
    common.setup_child()
    on_gpu = torch.cuda.is_available()
    config = common.llama_config(args.shape, args.layers)
    params = common.count_params(config)
    name = f"{args.shape}-L{config.num_hidden_layers}"
    print(f"{name}: {params['total'] / 1e9:.3f}B parameters ({params['block_linear'] / 1e9:.3f}B in block linears), "
          f"{'GPU ' + torch.cuda.get_device_name() if on_gpu else 'CPU'}")

    phases: dict[str, dict] = {}
    start = time.perf_counter()
    path = common.random_model(args.shape, args.layers, device="cuda" if on_gpu else "cpu")
    phases["build"] = {"seconds": time.perf_counter() - start, "peak_gb": common.proc_status_gb("VmHWM"),
                       "note": "host peak RSS; random shards written one block at a time (reused if present)"}

    model, phases["load"] = load_phase(path)
    print(f"load: {phases['load']}", flush=True)
    batches = common.random_batches(args.samples, 1, args.seq_len, config.vocab_size, seed=0)
    peft_model, phases["init"] = common.measure(lambda: common.qloraga_model(
        model, batches, r=args.r, init_memory_gb=args.init_memory_gb, chunk_blocks=args.chunk_blocks,
        estimator=args.estimator, svd_niter=args.svd_niter, gradient_checkpointing=not args.no_init_checkpointing))
    phases["init"]["chunks"] = peft_model.qloraga_report.chunks
    print(f"init: {phases['init']}", flush=True)

    train_batches = common.random_batches(args.steps, 1, args.seq_len, config.vocab_size, seed=1)
    phases["train"] = train_phase(peft_model, train_batches, checkpointing=not args.no_checkpointing)

    if on_gpu:
        phases["svd"] = svd_seconds(config)
    init_checkpointing = not args.no_init_checkpointing
    projected = projection(config, args.seq_len, args.r, args.init_memory_gb, args.chunk_blocks, init_checkpointing)
    projected_7b = projection(common.llama_config("llama2-7b"), 1024, 16, 4.0, None, init_checkpointing)
    rows = []
    for phase in ["load", "init", "train"]:
        res = phases[phase]
        rows.append({"phase": phase, "peak GiB": res["peak_gb"], "peak - before GiB": res["peak_gb"] - res["before_gb"],
                     **({"reserved GiB": res["reserved_gb"]} if on_gpu else {}),
                     "seconds": res["seconds"], "projected GiB (this shape)": total(projected[phase]),
                     "projected - load (this shape)": total(projected[phase]) - total(projected["load"]),
                     "projected GiB (Llama-2-7B)": total(projected_7b[phase]),
                     "< 16 GiB (measured)": res["peak_gb"] < GOAL_GIB,
                     "< 16 GiB (7B projection)": total(projected_7b[phase]) < GOAL_GIB})
    kind = common.memory_kind()
    print(f"\n{args.samples} gradient samples x {args.seq_len} tokens, r={args.r}, init_memory_gb={args.init_memory_gb}"
          f" ({phases['init']['chunks']} chunks), {args.steps} steps of 1x{args.seq_len}, checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}; peaks: {kind}\n")
    print(common.table(rows, list(rows[0])))
    if not on_gpu:
        print("\nOn a CPU the peaks include the interpreter and libraries (~0.4 GiB); the 7B column is a "
              "projection, not a measurement.")
    payload = {"shape": args.shape, "layers": config.num_hidden_layers, "params": params, "samples": args.samples,
               "seq_len": args.seq_len, "r": args.r, "init_memory_gb": args.init_memory_gb, "steps": args.steps,
               "estimator": args.estimator, "svd_niter": args.svd_niter,
               "checkpointing": not args.no_checkpointing, "init_checkpointing": init_checkpointing,
               "memory_kind": kind, "phases": phases, "rows": rows,
               "projection_this_shape": projected, "projection_llama2_7b": projected_7b,
               "projection_note": "analytic, not measured: see projection() in bench/llama7b.py",
               "measured_on": "gpu" if on_gpu else "cpu"}
    out_name = ("llama7b" + ("_tiny" if args.tiny else "" if on_gpu else f"_cpu_{name}_T{args.seq_len}")
                + ("" if args.estimator == "exact" else f"_{args.estimator}"))
    print(f"\nwrote {common.save(args.out, out_name, payload)}")


if __name__ == "__main__":
    main()
