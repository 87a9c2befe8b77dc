"""Score a base model, or a base plus a PEFT adapter, on a dataset: held-out loss and exact-match accuracy.

    qloraga evaluate --model BASE [--adapter RUN/adapter] --dataset eval.jsonl [--4bit]   (or scripts/evaluate.py)
"""

from __future__ import annotations

import argparse
import json
import sys

from peft import PeftModel
from transformers import AutoTokenizer

from qloraga.data import Collator, DataError, prepare_tokenizer, read_records, tokenize
from qloraga.evaluation import exact_match, held_out_loss
from qloraga.loading import load_model, model_source
from qloraga.recipe import DEMO_EVAL, DEMO_MODEL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qloraga evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="base model folder, .gguf or hub name (default: the demo)")
    p.add_argument("--adapter", help="PEFT adapter folder (e.g. RUN/adapter); none scores the base alone")
    p.add_argument("--dataset", default=str(DEMO_EVAL), help="JSON/JSONL/CSV/Parquet file or hub name")
    p.add_argument("--dataset-format", default="auto", help="auto, alpaca, messages, prompt-completion or text")
    p.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="load the base in 4-bit NF4")
    p.add_argument("--seq-len", type=int, default=1024, help="maximum tokens per sample")
    p.add_argument("--eval-samples", type=int, default=200, help="samples scored by exact match")
    args = p.parse_args(argv)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.adapter or model_source(args.model))
        prepare_tokenizer(tokenizer)
        records = read_records(args.dataset)
        examples, _ = tokenize(records, args.dataset_format, tokenizer, args.seq_len)
        model = load_model(args.model, load_in_4bit=args.load_in_4bit)
        if args.adapter:
            model = PeftModel.from_pretrained(model, args.adapter)
        result = {
            "eval_loss": held_out_loss(model, examples, Collator(tokenizer.pad_token_id)),
            "accuracy": exact_match(model, tokenizer, records, args.dataset_format, max_samples=args.eval_samples),
            "samples": len(examples),
        }
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
