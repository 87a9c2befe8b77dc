"""Turn a run into a merged bf16 model (transformers, vLLM) or GGUF files (llama.cpp, Ollama, LM Studio).

    qloraga export --run runs/demo-20261127-101500 [--output merged-model]   (or python scripts/export.py ...)
    qloraga export --run RUN --format gguf [--checkpoint N]   # RUN/gguf/: adapter.gguf, model-f16.gguf,
        # model-q8_0.gguf, Modelfile (llama, mistral and qwen2 families, byte-level BPE tokenizers);
        # adapter-original.gguf too for a --quant-error run

The merged weights are `deq(Wq) + s B' A'`: the 4-bit weights the adapter was trained against, plus the
adapter, so the merged model computes what training saw. `--checkpoint N` exports checkpoint N of the run,
with the LoRA-GA correction folded in (a rank-2r adapter).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qloraga export", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="output folder of `qloraga finetune` (holds config.yaml, adapter/)")
    p.add_argument("--output", help="where to write (default: RUN/merged, or RUN/gguf with --format gguf)")
    p.add_argument("--format", choices=["merged", "gguf"], default="merged",
                   help="merged: a bf16 transformers folder; gguf: adapter.gguf, model-f16/q8_0.gguf, Modelfile")
    p.add_argument("--checkpoint", type=int, help="export checkpoints/checkpoint-N instead of the final adapter/")
    p.add_argument("--gguf-base", action="store_true",
                   help="with --format gguf: also write base-f16.gguf, the dequantized base adapter.gguf applies to")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype (default: the run's)")
    p.add_argument("--no-frame", action="store_true",
                   help="with --format gguf: the Modelfile sends a message as written, not inside the frame the "
                        "training prompts share")
    args = p.parse_args(argv)
    from qloraga.cli import run_command
    from qloraga.export import export_merged
    from qloraga.export.gguf import check_gguf_run, export_gguf
    from qloraga.runs import load_run_model, open_run

    def job() -> None:
        run = open_run(args.run)
        if args.format == "gguf":  # refuse an unsupported family or tokenizer before loading any weight
            check_gguf_run(run)
        model, tokenizer = load_run_model(run, checkpoint=args.checkpoint, dtype=args.dtype,
                                          original=args.format == "gguf")
        if args.format == "gguf":
            out = args.output or run.path / "gguf"
            written = export_gguf(model, tokenizer, out, base=args.gguf_base, fmt=run.dataset_format(),
                                  frame=None if args.no_frame else run.prompt_frame())
            print(f"GGUF files written to {out}: {', '.join(p.name for p in written)}."
                  + (f" Ollama: cd {out} && ollama create NAME -f Modelfile" if len(written) > 1 else ""))
            return
        out = export_merged(model, args.output or run.path / "merged", tokenizer=tokenizer)
        print(f"merged model written to {out}")

    return run_command(job, interrupted="stopped; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
