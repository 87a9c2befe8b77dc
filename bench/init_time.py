"""Benchmark 2: time of the LoRA-GA initialisation, against PEFT's and against plain training steps.

On the same gradient batches: (a) qloraga on the 4-bit model with 1, 2, 4, ... chunks; (b) PEFT 0.21
`lora_ga` on the bf16 model; (s) as many plain QLoRA training steps as there are gradient batches, through the
library's own Trainer (`common.library_trainer`, what `qloraga finetune` runs: the seconds of its steps, the
first with its lazy set-up). Each chunk is one pass over the batches (a full forward, and a backward that stops
at the chunk's first block), so the chunk count drives the time. Every round runs all configurations side by
side in one fresh process, in a rotated order; ratios are taken within a round, and the tables quote medians
over rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import torch

SCRIPT = Path(__file__).resolve()


def configs(layers: int, batches: int) -> dict[str, dict]:
    """name: what to run. (a) at 1, 2, 4, ... chunks with the exact SVD (the default), and at 1 chunk with the
    randomized SVD that PEFT and the reference code use (`svd_niter=4`), to show the SVD's share."""
    out = {f"(a) {k} chunk{'s' if k > 1 else ''}": {"kind": "qloraga", "chunks": k, "svd_niter": None}
           for k in [2**i for i in range(layers.bit_length()) if 2**i <= layers]}
    out["(a) 1 chunk, svd_niter=4"] = {"kind": "qloraga", "chunks": 1, "svd_niter": 4}
    out["(a) estimator=sketch (2 passes)"] = {"kind": "qloraga", "chunks": 1, "svd_niter": None, "estimator": "sketch"}
    out["(b) PEFT lora_ga"] = {"kind": "peft_loraga"}
    out[f"(s) {batches} QLoRA steps"] = {"kind": "steps"}
    return out


def child(spec: dict) -> dict:
    """One round: every configuration once, each on a freshly loaded model, in the order given."""
    common.setup_child()
    dtype = getattr(torch, spec["dtype"])
    batches = common.random_batches(spec["batches"], spec["batch_size"], spec["seq_len"], spec["vocab"])
    r, seconds = spec["r"], {}
    todo = configs(spec["layers"], spec["batches"])
    for name in spec["order"]:
        run = todo[name]
        model = common.load(spec["model"], four_bit=run["kind"] != "peft_loraga", dtype=dtype)
        common.touch(model, batches[0])
        if run["kind"] == "peft_loraga":
            seconds[name] = common.timed(lambda m=model: common.peft_loraga_model(m, batches, r=r))
        elif run["kind"] == "steps":
            trainer = common.library_trainer(common.plain_lora_model(model, r=r), batches)
            seconds[name] = sum(common.train_steps(trainer, len(batches)))
        else:
            blocks, niter, estimator = spec["layers"] // run["chunks"], run["svd_niter"], run.get("estimator", "exact")
            seconds[name] = common.timed(lambda m=model, k=blocks, n=niter, e=estimator: common.qloraga_model(
                m, batches, r=r, chunk_blocks=k, svd_niter=n, estimator=e))
        del model
        common.release_memory()
    return seconds


def plot_times(out: Path, name: str, rows: list[dict], title: str) -> None:
    """Seconds against chunks (exact SVD), the randomized-SVD and sketch variants, (b) and (s) as lines."""

    def draw(fig) -> None:
        ax = fig.subplots()
        exact = [r for r in rows if r["chunks"] != "" and "svd_niter" not in r["config"]]
        ax.plot([r["chunks"] for r in exact], [r["seconds"] for r in exact], "o-", label="(a) qloraga 4-bit, exact SVD")
        for r, marker in zip([r for r in rows if "svd_niter" in r["config"] or "sketch" in r["config"]], "sD",
                             strict=True):
            ax.plot([1], [r["seconds"]], marker, label=r["config"])
        for r, style in zip(rows[-2:], ["--", ":"], strict=True):
            ax.axhline(r["seconds"], linestyle=style, color="gray", label=r["config"])
        ax.set(xlabel="chunks", ylabel="seconds", title=title, ylim=(0, None))
        ax.set_xticks([r["chunks"] for r in exact])
        ax.legend(fontsize=8)

    common.plot(out, name, draw)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=list(common.SHAPES))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype (float32: NF4 weights with fp32 compute, and an fp32 model for (b))")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = p.parse_args()
    if common.serve_child(args, child):
        return
    if args.tiny:
        args.shape, args.layers, args.repeats, args.seq_len, args.r = "tiny", 2, 1, 8, 2
    suffix = ("_tiny" if args.tiny else "") + ("" if args.dtype == "bfloat16" else f"_{args.dtype}")
    if args.replot:
        saved = json.loads((args.out / f"init_time{suffix}.json").read_text())
        title = f"init time, {saved['shape']} x{saved['layers']} layers, {saved['dtype']}"
        plot_times(args.out, "init_time" + suffix, saved["rows"], title)
        return

    todo = configs(args.layers, args.batches)
    names = list(todo)
    config = common.llama_config(args.shape, args.layers)
    spec = {"model": str(common.random_model(args.shape, args.layers)), "layers": args.layers, "r": args.r,
            "batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "vocab": config.vocab_size, "dtype": args.dtype}
    rounds = []
    for i in range(args.repeats):
        order = common.rotated(names, i)
        rounds.append(common.run_child(SCRIPT, {**spec, "order": order}, child if args.tiny else None))
        print(f"round {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.1f}s" for k, v in rounds[-1].items()))

    b_name, s_name = names[-2], names[-1]
    rows = []
    for name in names:
        exact = todo[name]["kind"] == "qloraga" and "estimator" not in todo[name]
        rows.append({"config": name, "chunks": todo[name]["chunks"] if exact else "",
                     "seconds": common.median([r[name] for r in rounds]),
                     "/ (b)": common.median([r[name] / r[b_name] for r in rounds]),
                     "/ (s)": common.median([r[name] / r[s_name] for r in rounds])})
    params = common.count_params(config)
    print(f"\nShape {args.shape}, {args.layers} layers ({params['total'] / 1e6:.1f}M parameters), r={args.r}, "
          f"{args.batches} batches of {args.batch_size}x{args.seq_len} tokens, {args.dtype} compute, "
          f"median of {args.repeats} rounds:\n")
    print(common.table(rows, list(rows[0])))

    plot_times(args.out, "init_time" + suffix, rows, f"init time, {args.shape} x{args.layers} layers, {args.dtype}")
    payload = {"shape": args.shape, "layers": args.layers, "params": params, "r": args.r, "batches": args.batches,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
               "repeats": args.repeats, "rounds": rounds, "rows": rows}
    print(f"\nwrote {common.save(args.out, 'init_time' + suffix, payload)}")


if __name__ == "__main__":
    main()
