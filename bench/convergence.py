"""Benchmark 4: convergence of LoRA-GA on a 4-bit base against plain LoRA, bf16 LoRA-GA (ours and PEFT's)
and full fine-tuning, on two tasks of different kinds, from self-trained small base models.

Tasks: `demo`, the embedded demo (word problems answered by an equation, `Answer: 9 + 29 = 38`; base from
scripts/make_demo.py); `reverse`, reverse a sequence of 4-7 letters (a sequence transduction), from a base
pretrained here once (1500 steps, 5-12 minutes on a shared 2-core CPU; cached under bench/results/tmp) on
copying and rotating such sequences, never on reversing.
Every method runs the same loop (AdamW, warmup + cosine, same batches, same steps, same seeds). The
learning rate of each method is its best of one grid on the validation half of the held-out set (seed 0);
the test half gives the figures. Accuracy is exact match of the whole completion under teacher forcing
(every completion token is the argmax), which is what greedy decoding of the completion would produce.
Goal: LoRA-GA reaches plain LoRA's final test loss in <= 0.5x the steps.

Why its own loop (`train_curve`, `common.train_step`) and not `qloraga.recipe.finetune` or the library's
Trainer (issue 27): half of the rows are methods the library does not build (PEFT's LoRA-GA, full fine-tuning;
LoftQ and EVA in quant_gap.py), and one loop for every row, on one list of batches shared by all methods at a
seed, is what makes the rows comparable (the Trainer draws its batches from its own sampler); the same loop
serves real_convergence.py, long_horizon.py, multirun.py and gpu_study.py. What can be the library's is: batches
are collated by its `Collator`, and every qloraga row is built by `get_qloraga_model`. `evaluate` scores loss and
teacher-forced exact match in one forward, which `qloraga.evaluation` (greedy generation) does not. The reverse
task's base is pretrained by a loop of its own: a full model from scratch, not a fine-tune.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import common
import torch

from qloraga import QLoraGAConfig
from qloraga.batches import IGNORE, Collator
from qloraga.batches import Example as Row

ROOT = common.BENCH.parent
DEMO = ROOT / "qloraga" / "demo"
METHODS = {  # name: (bits, init, adapter dtype)
    "LoRA-GA 4-bit (qloraga)": (4, "qloraga", "float32"),
    "LoRA 4-bit (PEFT)": (4, "lora", "float32"),
    "LoRA-GA bf16 (qloraga)": (16, "qloraga", "float32"),
    "LoRA-GA bf16 (PEFT lora_ga)": (16, "peft_loraga", "float32"),
    "full fine-tuning bf16": (16, "full", None),
    "LoRA-GA 4-bit (qloraga, bf16 adapters)": (4, "qloraga", "bfloat16"),
    "LoRA-GA 4-bit (qloraga, sketch)": (4, "qloraga_sketch", "float32"),
}
PLAIN = "LoRA 4-bit (PEFT)"
OURS = "LoRA-GA 4-bit (qloraga)"
Example = tuple[list[int], list[int]]  # prompt ids, completion ids


@dataclass
class Task:
    name: str
    model_dir: Path
    train: list[Example]
    val: list[Example]
    test: list[Example]
    pad_id: int


# ------------------------------------------------------------------------------------------------ tasks


def demo_task() -> Task:
    """The embedded demo: prompt/completion JSONL, the demo's own word-level tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")

    def read(split: str) -> list[Example]:
        rows = [json.loads(line) for line in (DEMO / "data" / f"{split}.jsonl").read_text().splitlines() if line]
        return [(tokenizer(r["prompt"])["input_ids"], tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
                for r in rows]

    held_out = read("eval")
    return Task("demo", DEMO / "model", read("train"), held_out[::2], held_out[1::2], tokenizer.pad_token_id)


LETTERS = list("abcdefghijkl")
VOCAB = ["<pad>", "<s>", "</s>", "=", "copy", "rotate", "reverse", *LETTERS]
TOKEN = {w: i for i, w in enumerate(VOCAB)}


def sequence_example(op: str, rng: random.Random) -> Example:
    """`<s> op x1 .. xn =` -> the sequence copied, rotated left by one, or reversed."""
    seq = [rng.choice(LETTERS) for _ in range(rng.randint(4, 7))]
    out = {"copy": seq, "rotate": seq[1:] + seq[:1], "reverse": seq[::-1]}[op]
    return [TOKEN["<s>"], TOKEN[op], *(TOKEN[c] for c in seq), TOKEN["="]], [TOKEN[c] for c in out]


def reverse_base(path: Path, steps: int = 1500, seed: int = 1234) -> Path:
    """Pretrain (fp32, once) a small Llama on copying and rotating letter sequences; save it in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=TOKEN["<s>"], eos_token_id=TOKEN["</s>"], pad_token_id=TOKEN["<pad>"],
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.perf_counter()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        examples = [sequence_example(rng.choice(["copy", "rotate"]), rng) for _ in range(64)]
        loss = model(**collate(examples, TOKEN["<pad>"], prompt_loss=True)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"reverse base: step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    model.to(torch.bfloat16).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(VOCAB))
    return path


def reverse_task(pretrain_steps: int = 1500) -> Task:
    rng = random.Random(0)
    examples, seen = [], set()
    while len(examples) < 2200:
        ex = sequence_example("reverse", rng)
        if tuple(ex[0]) not in seen:  # held-out sequences never occur in train
            seen.add(tuple(ex[0]))
            examples.append(ex)
    path = reverse_base(common.TMP / f"reverse-base-{pretrain_steps}", pretrain_steps)
    return Task("reverse", path, examples[:2000], examples[2000::2], examples[2001::2], TOKEN["<pad>"])


def collate(examples: list[Example], pad_id: int, prompt_loss: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch by the library's `Collator`; labels on the completion only (and on the prompt too, all
    but its first token, for pretraining)."""
    rows = [Row(p + c, [IGNORE, *(p + c)[1:]] if prompt_loss else [IGNORE] * len(p) + c) for p, c in examples]
    return Collator(pad_id)(rows)


# ----------------------------------------------------------------------------------------- train, eval


@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, batch_size: int = 100) -> tuple[float, float]:
    """Mean loss per completion token, and exact match (every completion token is the greedy argmax)."""
    model.eval()
    total_loss, tokens, correct = 0.0, 0, 0
    device = common.device_of(model)
    for i in range(0, len(examples), batch_size):
        batch = common.to_device(collate(examples[i:i + batch_size], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = labels != -100
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        total_loss += losses[mask].sum().item()
        tokens += mask.sum().item()
        hits = (logits.argmax(-1) == labels) | ~mask
        correct += hits.all(dim=1).sum().item()
    model.train()
    return total_loss / tokens, correct / len(examples)


def build(method: str, task: Task, grad_batches: list[dict], r: int, dtype: torch.dtype, stable_gamma: float):
    """The model to train, with the given method's initialisation: (model, parameters to train, autocast)."""
    bits, init, adapter_dtype = METHODS[method]
    model = common.load(task.model_dir, four_bit=bits == 4, dtype=dtype)
    if init in ("qloraga", "qloraga_sketch"):
        model = common.qloraga_model(model, grad_batches, r=r, adapter_dtype=adapter_dtype, stable_gamma=stable_gamma,
                                     estimator="sketch" if init == "qloraga_sketch" else "exact")
    elif init == "peft_loraga":
        model = common.peft_loraga_model(model, grad_batches, r=r)
    elif init == "lora":
        model = common.plain_lora_model(model, r=r, adapter_dtype=adapter_dtype)
    else:  # full fine-tuning: fp32 master weights (and bf16 autocast if bf16 compute, as a bf16 Trainer run)
        model = model.float()
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.parameters()), dtype == torch.bfloat16
    return model, common.trainable(model), False


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over 3% of the steps, then cosine decay to zero (the demo recipe's schedule)."""
    warmup = max(1, round(0.03 * steps))
    if step <= warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def evaluated(eval_every: int | Collection[int]) -> Callable[[int], bool]:
    """Whether a step is evaluated: every `eval_every` steps, or exactly the steps it lists."""
    return (lambda s: s % eval_every == 0) if isinstance(eval_every, int) else (lambda s: s in eval_every)


def train_curve(model, optimizer, order: list[dict], task, lr: float, eval_every: int | Collection[int], *,
                autocast: bool = False, eval_batch: int = 100) -> dict[str, list]:
    """One step per batch of `order` (warmup + cosine from `lr`), the test split's loss and accuracy at step 0,
    every `eval_every` steps (or at exactly the steps it lists) and at the end."""
    steps = len(order)
    due = evaluated(eval_every)
    curve: dict[str, list] = {"step": [], "test_loss": [], "test_acc": [], "train_loss": []}

    def record(step: int) -> None:
        test_loss, test_acc = evaluate(model, task.test, task.pad_id, batch_size=eval_batch)
        curve["step"].append(step)
        curve["test_loss"].append(test_loss)
        curve["test_acc"].append(test_acc)

    record(0)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        curve["train_loss"].append(common.train_step(model, optimizer, order[step - 1], autocast=autocast))
        if due(step) or step == steps:
            record(step)
    return curve


def train_run(task: Task, method: str, lr: float, seed: int, args) -> dict:
    """One run: the method's init on the seed's gradient batches, then `steps` AdamW steps, evaluated as it goes.

    The test half is evaluated every `eval_every` steps (the curves); the validation half at the end (the
    learning-rate choice).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    grad_batches = [collate(rng.sample(task.train, args.batch_size), task.pad_id) for _ in range(args.grad_batches)]
    order = [collate(rng.sample(task.train, args.batch_size), task.pad_id) for _ in range(args.steps)]
    start = time.perf_counter()
    model, params, autocast = build(method, task, grad_batches, args.r, getattr(torch, args.dtype),
                                    args.stable_gamma)
    init_s = time.perf_counter() - start
    curve = train_curve(model, common.make_optimizer(params, lr), order, task, lr, args.eval_every, autocast=autocast)
    val_loss, val_acc = evaluate(model, task.val, task.pad_id)
    print(f"{task.name}: {method}, lr {lr:g}, seed {seed}: test loss {curve['test_loss'][-1]:.4f}, accuracy "
          f"{curve['test_acc'][-1]:.2f}, val loss {val_loss:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return {"method": method, "lr": lr, "seed": seed, "load_init_s": init_s,
            "train_eval_s": time.perf_counter() - start - init_s, "val_loss": val_loss, "val_acc": val_acc, **curve}


# ------------------------------------------------------------------------------------------------ report


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float:
    """First evaluated step whose loss is <= target (nan if never)."""
    return next((s for s, v in zip(steps, losses, strict=True) if v <= target), float("nan"))


def mean_curve(runs: list[dict], key: str) -> list[float]:
    return [sum(r[key][i] for r in runs) / len(runs) for i in range(len(runs[0][key]))]


def summarize(task: str, chosen: dict[str, float], runs: dict[str, list[dict]], steps: int,
              plain: str = PLAIN) -> list[dict]:
    """Per method: final test loss and accuracy (mean, min, max over seeds), steps to `plain`'s final loss."""
    target = mean_curve(runs[plain], "test_loss")[-1] if plain in runs else float("nan")
    rows = []
    for method, method_runs in runs.items():
        curve = mean_curve(method_runs, "test_loss")
        reach = steps_to_reach(method_runs[0]["step"], curve, target)
        finals = [r["test_loss"][-1] for r in method_runs]
        accs = [r["test_acc"][-1] for r in method_runs]
        rows.append({"task": task, "method": method, "lr": chosen[method], "seeds": len(method_runs),
                     "final test loss": sum(finals) / len(finals), "min": min(finals), "max": max(finals),
                     "test accuracy": sum(accs) / len(accs), "acc min": min(accs), "acc max": max(accs),
                     "steps to LoRA final": reach, "x LoRA's steps": reach / steps,
                     "load+init s": common.median([r["load_init_s"] for r in method_runs]),
                     "train+eval s": common.median([r["train_eval_s"] for r in method_runs])})
    return rows


def draw_curves(fig, results: dict[str, dict], plain: str = PLAIN, title: str = "task: {}") -> None:
    """Mean test-loss curve of each method (band: min to max over seeds), one panel per task."""
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (task, res) in zip(axes, results.items(), strict=True):
        for method, method_runs in res["runs"].items():
            steps = method_runs[0]["step"]
            curve = mean_curve(method_runs, "test_loss")
            lo = [min(r["test_loss"][i] for r in method_runs) for i in range(len(steps))]
            hi = [max(r["test_loss"][i] for r in method_runs) for i in range(len(steps))]
            (line,) = ax.plot(steps, curve, label=f"{method} (lr {res['chosen'][method]:g})", lw=1.4)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        if plain in res["runs"]:
            target = mean_curve(res["runs"][plain], "test_loss")[-1]
            ax.axhline(target, color="gray", ls=":", lw=1, label=f"{plain}: final loss")
        ax.set(yscale="log", xlabel="step", ylabel="held-out (test) loss", title=title.format(task))
        ax.legend(fontsize=6)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["demo", "reverse"], choices=["demo", "reverse"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="the one grid for every method")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=125, help="125 x 16 = one epoch of the demo's 2000 examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-batches", type=int, default=8, help="LoRA-GA gradient batches (x batch size samples)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--stable-gamma", type=float, default=QLoraGAConfig.stable_gamma,
                   help="qloraga's stable_gamma (default: the library's, the paper's 16)")
    p.add_argument("--pretrain-steps", type=int, default=1500, help="pretraining steps of the reverse base")
    p.add_argument("--eval-examples", type=int, default=None, help="at most this many val and test examples")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bf16 weights either way; bf16 compute is ~3x slower on a CPU without "
                        "AVX512-BF16)")
    args = p.parse_args()
    if args.tiny:
        args.tasks, args.lrs, args.seeds, args.steps, args.eval_every = ["reverse"], [1e-3], 1, 2, 1
        args.grad_batches, args.batch_size, args.pretrain_steps, args.r, args.eval_examples = 1, 4, 2, 2, 8
        args.methods = list(METHODS)
    common.setup_child()
    suffix = "_tiny" if args.tiny else ""
    for name in args.tasks:
        task = demo_task() if name == "demo" else reverse_task(args.pretrain_steps)
        task.val, task.test = task.val[:args.eval_examples], task.test[:args.eval_examples]
        grid = {m: [train_run(task, m, lr, 0, args) for lr in args.lrs] for m in args.methods}
        chosen = {m: min(runs, key=lambda r: r["val_loss"])["lr"] for m, runs in grid.items()}
        runs = {m: [next(r for r in grid[m] if r["lr"] == chosen[m])] for m in args.methods}
        for m in args.methods:
            runs[m] += [train_run(task, m, chosen[m], seed, args) for seed in range(1, args.seeds)]
        rows = summarize(name, chosen, runs, args.steps)
        grid_rows = [{"method": m, "lr": r["lr"], "final val loss": r["val_loss"], "val accuracy": r["val_acc"]}
                     for m, rs in grid.items() for r in rs]
        print(f"\nTask {name}: {len(task.train)} train, {len(task.val)} val, {len(task.test)} test; {args.steps} "
              f"steps of batch {args.batch_size}, r={args.r}, {args.seeds} seeds, lr grid {args.lrs} (seed 0, val)\n")
        print(common.table(rows, ["method", "lr", "final test loss", "min", "max", "test accuracy", "acc min",
                                  "acc max", "steps to LoRA final", "x LoRA's steps", "load+init s", "train+eval s"]))
        payload = {"task": name, "methods": args.methods, "lrs": args.lrs, "seeds": args.seeds, "steps": args.steps,
                   "batch_size": args.batch_size, "grad_batches": args.grad_batches, "r": args.r,
                   "eval_every": args.eval_every, "dtype": args.dtype, "stable_gamma": args.stable_gamma,
                   "chosen": chosen, "rows": rows,
                   "grid": grid_rows, "base": str(task.model_dir.relative_to(ROOT)),
                   "base_sha256": common.sha256(task.model_dir / "model.safetensors"), "runs": runs}
        print(f"\nwrote {common.save(args.out, f'convergence_{name}{suffix}', payload)}")
    # One PNG with every task that has results in the folder.
    results = {}
    for name in ["demo", "reverse"]:
        path = args.out / f"convergence_{name}{suffix}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    common.plot(args.out, "convergence" + suffix, lambda fig: draw_curves(fig, results),
                figsize=(6.2 * len(results), 4.6))


if __name__ == "__main__":
    main()
