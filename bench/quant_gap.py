"""The 4-bit gap (issue 26): which init closes the distance between QLoRA and LoRA on the unquantized base, and
does it last? SmolLM2-135M-Instruct in NF4 on three human-written tasks (debian, pydoc, manpages), 100 steps.

Protocol (section 6's, on `real_convergence.py`'s functions): r = 8 on every projection, AdamW, 3% warmup
then cosine, clipping at 1, fp32 compute; the same training batches and gradient batches for every method
at a seed. Held-out loss per completion token on the 64 test rows plus the last `--held-out-from-train`
train rows (`long_horizon.held_out_task`) at `--eval-steps`; exact match at the end; the rate chosen on the
64 validation rows (seed 0, lowest final loss), never on the held-out set. Each (task, method) runs seed 0
at each rate of its `--lrs` (rate by rate over all tasks and methods, so that a cut leaves whole rates), then
seeds 1.. at the chosen rate; every run is saved as it ends (merged with the runs other processes saved in the
same file), and a rerun skips the runs the JSON files already hold.

Why not `qloraga.recipe.finetune` (issue 27): PEFT's LoftQ, EVA and full fine-tuning, half of the rows,
cannot run through it, and one loop for every row is what makes the rows comparable; the recipe's batches
come from the Trainer's sampler, not from a list shared by all methods at a seed.

    cd bench     # from a frozen checkout (git worktree, PYTHONPATH on it), one thread per process
    OMP_NUM_THREADS=1 python quant_gap.py --tasks debian pydoc manpages --methods "QLoRA (PEFT, B=0)" \
        --lrs 3e-4 1e-3 3e-3 &       # and the other methods in a second process
    python quant_gap.py --report     # the tables, bench/results/quant_gap.json and quant_gap.png
    python quant_gap.py --tiny       # smoke run
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import common
import convergence
import long_horizon as lh
import real_convergence as rc
import torch

from qloraga import QLoraGAConfig, get_qloraga_model

LORA16 = "LoRA (PEFT, unquantized base)"
LORA_ONE = "LoRA-One (qloraga)"
QE_LORA_ONE = "LoRA-One + quant-error fit (qloraga)"
# The frozen fit alone: the trainable adapter starts as PEFT's (Kaiming A, B = 0) on the fit, so step 0 is the
# NF4 base plus the fit, and training is plain LoRA on top.
QE_ALONE = "quant-error fit alone (qloraga, B=0)"
# PEFT's own inits on the same NF4 base (B = 0 for EVA; LoftQ's one-iteration residual fit). Others: rc.METHODS.
PEFT_PEERS = {"LoftQ (PEFT, 1 iteration)": "loftq", "EVA (PEFT)": "eva"}
# The settings a run's result depends on (with its rate and seed): runs saved under other values are not reused.
SETTINGS = ("steps", "eval_steps", "held_out_from_train", "batch_size", "grad_batches", "r")


def loftq_model(model, base_path: str, r: int):
    """PEFT LoRA on the NF4 model, A and B from LoftQ's rank-r SVD of `W - deq(Wq)` (one iteration, the base
    kept), as `peft.replace_lora_weights_loftq` computes it, with its SVD (`_low_rank_decomposition`). That
    function cannot run here: PEFT 0.21 sends the weights to "cuda" (or "xpu") unconditionally. Its scale is
    also corrected: PEFT sets `B A = W - deq(Wq)` and the layer adds `alpha/r B A` (peft#1982); here
    `s B A = W - deq(Wq)`."""
    from peft.utils.loftq_utils import _low_rank_decomposition
    from safetensors import safe_open

    from qloraga.loading import dequantized_weight

    model = common.plain_lora_model(model, r=r)
    index = {}  # tensor name -> the open safetensors file that holds it
    for f in sorted(Path(base_path).glob("*.safetensors")):
        handle = safe_open(f, "pt")
        index.update(dict.fromkeys(handle.keys(), handle))
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        residual = index[key].get_tensor(key).float() - dequantized_weight(module.base_layer).float()
        low_rank = _low_rank_decomposition(residual, reduced_rank=r)
        root = module.scaling["default"] ** 0.5
        module.lora_A["default"].weight.data = (low_rank["R"] / root).contiguous()
        module.lora_B["default"].weight.data = (low_rank["L"] / root).contiguous()
    return model


def eva_model(model, grad_batches: list[dict], r: int):
    """PEFT's EVA: A from the top right singular vectors of each layer's inputs on the gradient batches
    (completion tokens), ranks redistributed at r's budget (rho = 2, PEFT's default), B = 0."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=common.LLAMA_TARGETS, lora_dropout=0.0,
                        init_lora_weights="eva", eva_config=EvaConfig(), task_type="CAUSAL_LM")
    model = get_peft_model(model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(model, dataloader=grad_batches, show_progress_bar=False)
    return model


def build(method: str, base_path: str, grad_batches: list[dict], r: int, seed: int):
    """`real_convergence.build`, and PEFT's LoftQ and EVA on the same NF4 load."""
    if method not in PEFT_PEERS and method != QE_ALONE:
        return rc.build(method, base_path, grad_batches, r, seed)
    model = common.load(base_path, four_bit=True, dtype=torch.float32)
    torch.manual_seed(seed)  # PEFT's Kaiming A where the init does not set it
    if method == QE_ALONE:  # the library's "fit alone" (--init lora --quant-error activation), rc.build's settings
        config = QLoraGAConfig(r=r, lora_alpha=2 * r, adapter_dtype="float32", seed=seed, svd_niter=4, progress=False,
                               **rc.QLORAGA_INITS["lora-one-qe"])
        model = get_qloraga_model(model, config, grad_batches, step=False)
    elif PEFT_PEERS[method] == "loftq":
        model = loftq_model(model, base_path, r)
    else:
        model = eva_model(model, grad_batches, r)
    return model, lambda lr: common.make_optimizer(common.trainable(model), lr)


# ------------------------------------------------------------------------------------------------ runs


def result_path(out: Path, task: str, method: str, suffix: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")
    return out / f"quant_gap_{task}_{slug}{suffix}.json"


def saved_runs(path: Path, method: str, settings: dict) -> dict[tuple[float, int], dict]:
    """The runs a result file holds under the same settings, by (rate, seed)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    same = old.get("method") == method and all(old.get("settings", {}).get(k) == v for k, v in settings.items())
    return {(r["lr"], r["seed"]): r for r in old.get("runs", [])} if same else {}


def chosen_rate(runs: dict[tuple[float, int], dict], lrs: list[float] | None = None) -> float | None:
    """The rate whose seed-0 run has the lowest validation loss (among `lrs` if given)."""
    seed0 = [r for (lr, seed), r in runs.items() if seed == 0 and (lrs is None or lr in lrs)]
    return min(seed0, key=lambda r: r["val_loss"])["lr"] if seed0 else None


def run_once(task: rc.Task, method: str, lr: float, seed: int, args, base_path: str, suffix: str) -> None:
    """One run unless its file has it; saved as soon as it ends, merged with what other processes saved."""
    path = result_path(args.out, task.name, method, suffix)
    settings = {k: getattr(args, k) for k in SETTINGS}
    if (lr, seed) in saved_runs(path, method, settings):
        return
    run = rc.train_run(task, method, lr, seed, args, base_path, build_model=build)
    runs = {**saved_runs(path, method, settings), (lr, seed): run}
    payload = {"task": task.name, "method": method, "settings": settings, "held_out": len(task.test),
               "val": len(task.val), "train_pool": len(task.train), "chosen": chosen_rate(runs),
               "runs": sorted(runs.values(), key=lambda r: (r["seed"], r["lr"]))}
    common.save(args.out, path.stem, payload)


def run_all(tasks: list[rc.Task], args, base_path: str, suffix: str) -> None:
    """Seed 0 at each rate in turn, over every task and method (so a cut leaves whole rates), then seeds
    1.. at each (task, method)'s chosen rate (the lowest seed-0 validation loss of `--lrs`)."""
    settings = {k: getattr(args, k) for k in SETTINGS}
    for lr in args.lrs:
        for task in tasks:
            for method in args.methods:
                run_once(task, method, lr, 0, args, base_path, suffix)
    for seed in range(1, args.seeds):
        for task in tasks:
            for method in args.methods:
                runs = saved_runs(result_path(args.out, task.name, method, suffix), method, settings)
                run_once(task, method, chosen_rate(runs, args.lrs), seed, args, base_path, suffix)


# ---------------------------------------------------------------------------------------------- report


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def gap_closed(qlora: float, lora16: float, loss: float) -> float:
    """Share of the QLoRA -> unquantized-LoRA gap a method closes: 0 at QLoRA's loss, 1 at LoRA's."""
    return (qlora - loss) / (qlora - lora16)


def task_report(results: list[dict]) -> dict:
    """One task's rows at each method's chosen rate, its grid, and the decision rule's verdict per new init."""
    chosen = {r["method"]: r["chosen"] for r in results}
    runs = {r["method"]: [x for x in r["runs"] if x["lr"] == r["chosen"]] for r in results}
    final = {m: sum(x["test_loss"][-1] for x in rs) / len(rs) for m, rs in runs.items()}
    steps = runs[next(iter(runs))][0]["step"]
    rows = []
    for method, method_runs in runs.items():
        row = {"method": method, "lr": chosen[method], "seeds": len(method_runs)}
        for i, step in enumerate(steps):
            row[f"step {step}"] = spread([x["test_loss"][i] for x in method_runs])
        row["exact match"] = f"{100 * sum(x['test_acc'][-1] for x in method_runs) / len(method_runs):.1f}%"
        if rc.PLAIN in final and LORA16 in final:
            row["gap closed"] = f"{100 * gap_closed(final[rc.PLAIN], final[LORA16], final[method]):.0f}%"
        rows.append(row)
    grid = [{"method": r["method"], "lr": x["lr"], "val loss": x["val_loss"], "held-out loss": x["test_loss"][-1],
             "exact match": x["test_acc"][-1]} for r in results for x in r["runs"] if x["seed"] == 0]
    return {"chosen": chosen, "runs": runs, "rows": rows, "grid": grid, "final": final}


def verdict(reports: dict[str, dict], method: str) -> dict:
    """Issue 26's rule: ahead of both QLoRA and LoRA-One outside the seed spread (its worst seed below their
    best) on >= 2 of 3 tasks, and never worse than QLoRA at a rate both ran (seed 0, held-out loss)."""
    ahead, worse, one_seed = [], [], []
    for task, rep in reports.items():
        if method not in rep["runs"] or not {rc.PLAIN, LORA_ONE} <= rep["runs"].keys():
            continue
        if any(len(rep["runs"][m]) < 2 for m in (method, rc.PLAIN, LORA_ONE)):
            one_seed.append(task)  # no spread to be outside of
        worst = max(x["test_loss"][-1] for x in rep["runs"][method])
        if all(worst < min(x["test_loss"][-1] for x in rep["runs"][m]) for m in (rc.PLAIN, LORA_ONE)):
            ahead.append(task)
        mine = {g["lr"]: g["held-out loss"] for g in rep["grid"] if g["method"] == method}
        plain = {g["lr"]: g["held-out loss"] for g in rep["grid"] if g["method"] == rc.PLAIN}
        worse += [f"{task} at {lr:g}" for lr in mine.keys() & plain.keys() if mine[lr] > plain[lr]]
    holds = len(ahead) >= 2 and not worse
    return {"ahead on": ahead, "worse than QLoRA": worse, "single-seed tasks": one_seed,
            "rule holds": "undecided: one seed, no spread" if holds and one_seed else holds}


def report(out: Path, suffix: str) -> None:
    """Tables per task, the verdict for every qloraga method, JSON and plot from the saved files."""
    reports = {}
    for task in rc.TASK_NAMES:
        files = sorted(out.glob(f"quant_gap_{task}_*{suffix}.json"))
        results = [json.loads(f.read_text()) for f in files if suffix or not f.stem.endswith("_tiny")]
        results = [r for r in results if r.get("chosen") is not None]
        if results:
            results.sort(key=lambda r: (r["method"] != rc.PLAIN, r["method"] != LORA16, r["method"]))
            reports[task] = task_report(results)
            reports[task]["sources"] = [f.name for f in files]
    if not reports:
        raise SystemExit(f"no quant_gap results in {out}: run the methods first")
    for task, rep in reports.items():
        print(f"\n{task}: held-out loss per completion token at the chosen rate, mean (min-max over seeds)\n")
        print(common.table(rep["rows"], list(dict.fromkeys(k for row in rep["rows"] for k in row))))
        print("\nEvery rate (seed 0):\n")
        print(common.table(rep["grid"], ["method", "lr", "val loss", "held-out loss", "exact match"]))
    methods = {m for rep in reports.values() for m in rep["runs"]} - {rc.PLAIN, LORA16, LORA_ONE}
    verdicts = {m: verdict(reports, m) for m in sorted(methods)}
    print("\nDecision rule (issue 26):", json.dumps(verdicts, indent=1))
    payload = {"tasks": {t: {k: v for k, v in rep.items() if k != "runs"} for t, rep in reports.items()},
               "verdicts": verdicts}
    print(f"\nwrote {common.save(out, f'quant_gap{suffix}', payload)}")
    title = "SmolLM2-135M-Instruct, {}: held-out loss"
    print("wrote", common.plot(out, f"quant_gap{suffix}", figsize=(6.4 * len(reports), 4.8), draw=lambda fig:
          convergence.draw_curves(fig, reports, plain=rc.PLAIN, title=title)))


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=rc.TASK_NAMES, choices=rc.TASK_NAMES)
    p.add_argument("--methods", nargs="+", choices=[*rc.METHODS, QE_ALONE, *PEFT_PEERS], help="run in this order")
    p.add_argument("--lrs", type=float, nargs="+", help="the methods' grid (seed 0 at each)")
    p.add_argument("--seeds", type=int, default=1, help="then seeds 1.. at the chosen rate")
    p.add_argument("--report", action="store_true", help="only the tables and plot from the saved JSON files")
    lh.horizon_args(p, steps=100, eval_steps=[10, 25, 50, 100], batch_size=4, grad_batches=8)
    args = p.parse_args()
    suffix = "_tiny" if args.tiny else ""
    if args.report:
        return report(args.out, suffix)
    if args.tiny:
        args.tasks, args.lrs, args.seeds, args.steps, args.eval_steps = ["debian"], [1e-3, 3e-3], 2, 2, [1]
        args.methods = [rc.PLAIN, LORA16, LORA_ONE, QE_LORA_ONE, QE_ALONE, *PEFT_PEERS]
        args.grad_batches, args.batch_size, args.r, args.held_out_from_train = 1, 2, 2, 4
    elif not args.methods or not args.lrs:
        p.error("give --methods and --lrs (or --report)")
    args.eval_every = args.eval_steps  # what real_convergence.train_run passes to train_curve
    common.setup_child()
    from transformers import AutoTokenizer

    from qloraga.model_source import model_source

    base_path = rc.tiny_base() if args.tiny else model_source(str(rc.smollm2_gguf()))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tasks = [lh.held_out_task(rc.load_task(name, tokenizer), args.held_out_from_train) for name in args.tasks]
    if args.tiny:
        for task in tasks:
            task.val, task.test = task.val[:4], task.test[-8:]
    run_all(tasks, args, base_path, suffix)
    if args.tiny:
        report(args.out, suffix)


if __name__ == "__main__":
    main()
