"""A/B of qloraga's correction forward on a GPU: the stacked `[A; A0]` product against the earlier one.

The earlier forward multiplied x by A and by A0 separately and concatenated the two outputs; the current
one multiplies x once by the stacked `[A; A0]` (when there is no dropout). One process builds plain PEFT
QLoRA and qloraga models (bf16 and fp32 adapters; the qloraga model is timed with either forward) and
times them in rotated rounds, each model training through the library's own Trainer (`common.library_trainer`);
the ratios plain / qloraga are medians of per-round ratios.
Meant for a GPU: `python bench/forward_ab.py --seq-len 4096`.
"""

from __future__ import annotations

import statistics

import common
import torch
import torch.nn.functional as F

from qloraga.adapters import ResidualCorrection


def earlier_forward(module, active_adapter, x, result, **kwargs):
    """The forward before the stacked product (kept here only to measure against)."""
    lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
    x = x.to(lora_a.weight.dtype)
    h = torch.cat([lora_a(module.lora_dropout[active_adapter](x)), F.linear(x, module.qloraga_A0)], dim=-1)
    delta = F.linear(h, torch.cat([lora_b.weight, -module.qloraga_B0], dim=1))
    return result + (delta * module.scaling[active_adapter]).to(result.dtype)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.set_defaults(repeats=5)
    args = p.parse_args()
    shape, tokens, layers = "llama2-7b", args.seq_len, args.layers
    if args.tiny:
        shape, tokens, layers, args.repeats = "tiny", 8, 2, 1
    config = common.llama_config(shape, layers)
    path = str(common.random_model(shape, layers, device="cuda" if torch.cuda.is_available() else "cpu"))
    batches = common.random_batches(3, 1, tokens, config.vocab_size, seed=1)
    saved = ResidualCorrection.__dict__["forward"]  # the staticmethod itself: restored after the rounds
    current = ResidualCorrection.forward
    models = {}
    for dtype in ["bfloat16", "float32"]:
        plain = common.plain_lora_model(common.load(path, True), r=8, adapter_dtype=dtype)
        models[f"plain {dtype}"] = (common.library_trainer(plain, batches, lr=1e-5), None)
        ours = common.qloraga_model(common.load(path, True), batches, r=8, adapter_dtype=dtype, svd_niter=4)
        trainer = common.library_trainer(ours, batches, lr=1e-5)  # one model, timed with either forward
        models[f"ours-old {dtype}"] = (trainer, earlier_forward)
        models[f"ours-new {dtype}"] = (trainer, current)

    def steps(name: str, n: int) -> float:
        trainer, forward = models[name]
        if forward is not None:
            ResidualCorrection.forward = staticmethod(forward)
        return sum(common.train_steps(trainer, n)) / n

    names, rounds = list(models), []
    try:
        for name in models:  # warm-up
            steps(name, 1)
        for i in range(args.repeats):
            rounds.append({n: steps(n, 3) for n in common.rotated(names, i)})
            print({k: round(v * 1e3, 1) for k, v in rounds[-1].items()}, flush=True)
    finally:
        ResidualCorrection.forward = saved
    for dtype in ["bfloat16", "float32"]:
        for version in ["old", "new"]:
            ratio = statistics.median([r[f"plain {dtype}"] / r[f"ours-{version} {dtype}"] for r in rounds])
            print(f"T={tokens} {dtype} adapters, {version} forward: plain/ours tokens/s ratio {ratio:.3f}")
    name = "forward_ab_tiny" if args.tiny else f"forward_ab_T{tokens}"
    print(f"wrote {common.save(args.out, name, {'seq_len': tokens, 'layers': layers, 'rounds': rounds})}")


if __name__ == "__main__":
    main()
