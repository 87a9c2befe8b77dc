"""Long-horizon convergence (issue 20): does LoRA-One's head start over tuned plain QLoRA last? Section 6's
protocol (bench/real_convergence.py: SmolLM2-135M-Instruct in NF4, fp32 compute, r = 8, batches of 8) on the
debian task, 5x its horizon: 60 steps, held-out loss on 100 examples at steps 0, 10, 20, 40 and 60.

Held-out set: the task's 64 test rows plus its last 36 train rows in file order. The file is ordered by a hash
of each record's key, so that slice is a fixed random sample; it leaves the training pool (1964 rows remain).
Each method runs at two learning rates, its two best of section 6's 12-step grid, the first being section 6's
pick: 3 seeds at the first, then seed 0 at the second; if that one ends with the lower loss on the 64
validation rows (never the reported set), its other seeds follow. Same batches for every method at a seed.
One process per method, so the two can run side by side at one thread each; every run is saved as it ends,
and a rerun of the same command skips the runs its JSON already holds.

    python bench/long_horizon.py --method "QLoRA (PEFT, B=0)" --lrs 3e-3 1e-2 &
    python bench/long_horizon.py --method "LoRA-One (qloraga)" --lrs 3e-3 1e-3 &
    wait; python bench/long_horizon.py --report     # the table, and the plot of every method's JSON
    python bench/long_horizon.py --tiny             # smoke run (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import common
import convergence
import real_convergence as rc

TASK = "debian"
# The settings a run's result depends on (with its rate and seed): runs saved under other values are not reused.
SETTINGS = ("steps", "eval_steps", "held_out_from_train", "batch_size", "grad_batches", "r")


def held_out_task(task: rc.Task, from_train: int) -> rc.Task:
    """The task with its last `from_train` train rows moved into the test split (the reported held-out set)."""
    if from_train <= 0:
        return task
    held_out = task.test + task.train[-from_train:]
    return rc.Task(task.name, task.train[:-from_train], by_length(task.val), by_length(held_out), task.pad_id)


def by_length(examples: list) -> list:
    """Shortest first: evaluation batches then pad less (the mean loss per token does not depend on order)."""
    return sorted(examples, key=lambda e: len(e[0]) + len(e[1]))


def result_path(out: Path, method: str, suffix: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")
    return out / f"long_horizon_{TASK}_{slug}{suffix}.json"


def run_method(method: str, task: rc.Task, args, base_path: str, suffix: str) -> None:
    """Every seed at the first rate, then seed 0 at the others; the rate with the lowest seed-0 validation loss
    is the choice, and gets every seed. Complete, that is "seed 0 at each rate, then seeds at the better one";
    cut short, it leaves the most useful part done: three seeds at the first rate."""
    path = result_path(args.out, method, suffix)
    settings = {k: getattr(args, k) for k in SETTINGS}
    done = {}
    for saved in [path, *args.resume_from]:
        old = json.loads(saved.read_text()) if saved.exists() else {}
        if old.get("method") == method and all(old["settings"].get(k) == v for k, v in settings.items()):
            done.update({(r["lr"], r["seed"]): r for r in old["runs"]})
    runs: dict[tuple[float, int], dict] = {}

    def run(lr: float, seed: int) -> None:
        if (lr, seed) not in runs:
            runs[lr, seed] = done.get((lr, seed)) or rc.train_run(task, method, lr, seed, args, base_path)
        tried = [r for r in runs.values() if r["seed"] == 0]
        payload = {"task": TASK, "method": method, "settings": settings, "lrs": args.lrs, "seeds": args.seeds,
                   "held_out": len(task.test), "val": len(task.val), "train_pool": len(task.train),
                   "chosen": min(tried, key=lambda r: r["val_loss"])["lr"] if tried else None,
                   "rates_tried": [r["lr"] for r in tried], "runs": list(runs.values())}
        common.save(args.out, path.stem, payload)

    for seed in range(args.seeds):
        run(args.lrs[0], seed)
    for lr in args.lrs[1:]:
        run(lr, 0)
    chosen = min((r for r in runs.values() if r["seed"] == 0), key=lambda r: r["val_loss"])["lr"]
    for seed in range(1, args.seeds):
        run(chosen, seed)
    print(f"wrote {path}", flush=True)


def spread_rows(runs: dict[str, list[dict]], chosen: dict[str, float], eval_steps: list[int]) -> list[dict]:
    """Per method at its chosen rate: held-out loss at each evaluated step, mean (min-max) over seeds."""
    rows = []
    for method, method_runs in runs.items():
        row = {"method": method, "lr": chosen[method], "seeds": len(method_runs)}
        for step in [0, *eval_steps]:
            i = method_runs[0]["step"].index(step)
            values = [r["test_loss"][i] for r in method_runs]
            row[f"step {step}"] = f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        rows.append(row)
    return rows


def report(out: Path, suffix: str) -> None:
    """Table and plot from every method's JSON in `out` (only runs at the chosen rate count)."""
    files = sorted(out.glob(f"long_horizon_{TASK}_*{suffix}.json"))
    results = [json.loads(f.read_text()) for f in files if suffix or not f.stem.endswith("_tiny")]
    results = [r for r in results if "method" in r and r["chosen"] is not None]
    results.sort(key=lambda r: r["method"] != rc.PLAIN)  # the reference first
    if not results:
        raise SystemExit(f"no finished long-horizon results in {out}: run the --method processes first")
    chosen = {r["method"]: r["chosen"] for r in results}
    runs = {r["method"]: [x for x in r["runs"] if x["lr"] == r["chosen"]] for r in results}
    settings = results[0]["settings"]
    rows = convergence.summarize(TASK, chosen, runs, settings["steps"], plain=rc.PLAIN)
    steps_rows = spread_rows(runs, chosen, settings["eval_steps"])
    grid_rows = [{"method": r["method"], "lr": x["lr"], "seed": x["seed"], "final val loss": x["val_loss"],
                  "final held-out loss": x["test_loss"][-1], "load+init s": x["load_init_s"],
                  "train+eval s": x["train_eval_s"]} for r in results for x in r["runs"]]
    print(f"\n{TASK}: {results[0]['held_out']} held-out, {results[0]['val']} val, {results[0]['train_pool']} train; "
          f"{settings['steps']} steps of {settings['batch_size']}\n")
    print(common.table(steps_rows, list(steps_rows[0])))
    print()
    print(common.table(rows, ["method", "lr", "seeds", "final test loss", "min", "max", "steps to LoRA final",
                              "x LoRA's steps"]))
    print("\nEvery run:\n")
    print(common.table(grid_rows, list(grid_rows[0])))
    payload = {"task": TASK, "settings": settings, "chosen": chosen, "rows": rows, "steps_rows": steps_rows,
               "grid": grid_rows, "sources": [f.name for f in files]}
    print(f"\nwrote {common.save(out, f'long_horizon_{TASK}{suffix}', payload)}")
    title = f"SmolLM2-135M-Instruct, 4-bit, {{}}: {settings['steps']} steps"
    print("wrote", common.plot(out, f"long_horizon_{TASK}{suffix}", figsize=(6.4, 4.8), draw=lambda fig:
          convergence.draw_curves(fig, {TASK: {"runs": runs, "chosen": chosen}}, plain=rc.PLAIN, title=title)))


def horizon_args(p: argparse.ArgumentParser, *, steps: int, eval_steps: list[int], batch_size: int,
                 grad_batches: int) -> None:
    """The run settings (`SETTINGS`) of a long-horizon comparison, at the script's defaults."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--eval-steps", type=int, nargs="+", default=eval_steps,
                   help="steps where the held-out loss is measured (and step 0, and the last)")
    p.add_argument("--held-out-from-train", type=int, default=36,
                   help="last train rows moved to the held-out set (with the 64 test rows)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--grad-batches", type=int, default=grad_batches,
                   help="calibration/gradient batches of the data inits")
    p.add_argument("--r", type=int, default=8)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--method", choices=list(rc.METHODS), help="the method this process runs")
    p.add_argument("--lrs", type=float, nargs="+",
                   help="its rates, best first (every seed at the first, seed 0 at the others)")
    p.add_argument("--resume-from", type=Path, nargs="*", default=[],
                   help="other JSON files of this method whose runs count as done (a rate run apart)")
    p.add_argument("--report", action="store_true", help="only the table and plot from the saved JSON files")
    p.add_argument("--seeds", type=int, default=3)
    horizon_args(p, steps=60, eval_steps=[10, 20, 40, 60], batch_size=8, grad_batches=2)
    args = p.parse_args()
    suffix = "_tiny" if args.tiny else ""
    if args.report:
        return report(args.out, suffix)
    if args.tiny:
        args.lrs, args.seeds, args.steps, args.eval_steps, args.held_out_from_train = [1e-3, 3e-3], 2, 2, [1], 4
        args.grad_batches, args.batch_size, args.r = 1, 2, 2
    elif args.method is None or args.lrs is None:
        p.error("give --method and --lrs (or --report)")
    args.eval_every = args.eval_steps  # what real_convergence.train_run passes to train_curve
    common.setup_child()
    from transformers import AutoTokenizer

    from qloraga.model_source import model_source

    base_path = rc.tiny_base() if args.tiny else model_source(str(rc.smollm2_gguf()))
    task = held_out_task(rc.load_task(TASK, AutoTokenizer.from_pretrained(base_path)), args.held_out_from_train)
    if args.tiny:
        task.val, task.test = task.val[:4], task.test[-8:]
    for method in [rc.PLAIN, "LoRA-One (qloraga)"] if args.tiny else [args.method]:
        run_method(method, task, args, base_path, suffix)
    if args.tiny:
        report(args.out, suffix)


if __name__ == "__main__":
    main()
