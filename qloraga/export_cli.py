"""Turn a finished run into a merged bf16 model that transformers (or vLLM) loads with no adapter.

    qloraga export --run runs/demo-20261127-101500 [--output merged-model]   (or python scripts/export.py ...)

The merged weights are `deq(Wq) + s B' A'`: the 4-bit weights the adapter was trained against, plus the
adapter, so the merged model computes what training saw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoTokenizer

from qloraga.export import export_adapter
from qloraga.loading import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qloraga export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="output folder of `qloraga finetune` (holds config.yaml, adapter/)")
    p.add_argument("--output", help="where to write the merged model (default: RUN/merged)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "config.yaml").exists() or not (run / "adapter" / "adapter_config.json").exists():
        print(f"error: {run} is not a finished run (config.yaml and adapter/ are missing).", file=sys.stderr)
        return 2
    config = yaml.safe_load((run / "config.yaml").read_text())
    base = load_model(config["model"], load_in_4bit=config["load_in_4bit"])
    model = PeftModel.from_pretrained(base, run / "adapter", autocast_adapter_dtype=False)
    out = export_adapter(model, args.output or run / "merged", merged=True,
                         tokenizer=AutoTokenizer.from_pretrained(run / "adapter"))
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
