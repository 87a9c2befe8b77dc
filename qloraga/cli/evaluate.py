"""Score a base model, or a base plus a PEFT adapter, on a dataset: held-out loss and exact-match accuracy.

    qloraga evaluate --model BASE [--adapter RUN/adapter] --dataset eval.jsonl [--4bit]   (or scripts/evaluate.py)
    qloraga evaluate --run RUN [--checkpoint N] [--dataset eval.jsonl]

With `--run`, the base is loaded exactly as the run loaded it (4-bit or not, compute dtype, quant storage,
trust_remote_code, from its config.yaml), with the run's adapter (or checkpoint N's) and tokenizer; the
dataset, its format and the sequence length default to the run's, so prompts are rendered as training rendered
them (the result's `format` and a line on stderr say which rendering).
"""

from __future__ import annotations

import argparse
import json
import sys

from peft import PeftModel
from transformers import AutoTokenizer

from qloraga.batches import Collator, tokenize
from qloraga.cli import run_command
from qloraga.config import DEMO_EVAL, DEMO_MODEL
from qloraga.data import read_records
from qloraga.errors import ConfigError
from qloraga.evaluation import exact_match, held_out_loss
from qloraga.formats import RENDERINGS, prepare_tokenizer, resolve_format
from qloraga.loading import load_model
from qloraga.model_source import model_source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qloraga evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", help="output folder of `qloraga finetune`: its base as loaded there, its adapter")
    p.add_argument("--checkpoint", type=int, help="with --run: score checkpoints/checkpoint-N instead of adapter/")
    p.add_argument("--model", help="base model folder, .gguf or hub name (default: the demo)")
    p.add_argument("--adapter", help="PEFT adapter folder (e.g. RUN/adapter); none scores the base alone")
    p.add_argument("--dataset", help="JSON/JSONL/CSV/Parquet file or hub name (default: the run's eval_dataset, "
                                     "or the demo's)")
    p.add_argument("--dataset-format", help="auto (default), alpaca, messages, prompt-completion or text")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="load the base in 4-bit NF4")
    p.add_argument("--seq-len", type=int, help="maximum tokens per sample (default: the run's, or 1024)")
    p.add_argument("--eval-samples", type=int, default=200,
                   help="samples scored by exact match (prompt-completion/alpaca data with answers of at most 32 "
                        "tokens; other data gets the loss alone)")
    args = p.parse_args(argv)
    if args.run and (args.model or args.adapter or args.load_in_4bit):
        p.error("--run loads the run's base and adapter: drop --model, --adapter and --4bit")
    if args.checkpoint is not None and not args.run:
        p.error("--checkpoint needs --run")
    def job() -> None:
        if args.run:
            from qloraga.runs import load_run_model, open_run

            run = open_run(args.run)
            cfg = run.config
            dataset = args.dataset or cfg.eval_dataset
            if dataset is None:
                raise ConfigError(f"The run {args.run} held out a split of its training data (no eval_dataset): "
                                  "pass --dataset.")
            fmt = args.dataset_format or run.dataset_format(default="auto")
            records = read_records(dataset)
            model, tokenizer = load_run_model(run, checkpoint=args.checkpoint)
            examples, _ = tokenize(records, fmt, tokenizer, args.seq_len or cfg.seq_len)
        else:
            model_name, fmt = args.model or str(DEMO_MODEL), args.dataset_format or "auto"
            tokenizer = AutoTokenizer.from_pretrained(args.adapter or model_source(model_name))
            prepare_tokenizer(tokenizer)
            records = read_records(args.dataset or str(DEMO_EVAL))
            examples, _ = tokenize(records, fmt, tokenizer, args.seq_len or 1024)
            model = load_model(model_name, load_in_4bit=args.load_in_4bit)
            if args.adapter:
                model = PeftModel.from_pretrained(model, args.adapter)
        fmt = resolve_format(records, fmt)
        print(f"[qloraga] prompts rendered as in training on {fmt} data: {RENDERINGS[fmt]}", file=sys.stderr)
        result = {
            "format": fmt,
            "eval_loss": held_out_loss(model, examples, Collator(tokenizer.pad_token_id)),
            "accuracy": exact_match(model, tokenizer, records, fmt, max_samples=args.eval_samples),
            "samples": len(examples),
        }
        print(json.dumps(result, indent=2))

    return run_command(job, interrupted="stopped; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
