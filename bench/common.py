"""What every benchmark shares: model shapes, random checkpoints and batches, the methods compared, training
through the library's own Trainer (`library_trainer`, what `qloraga finetune` runs), peak memory readings, the
fresh-subprocess harness, and result tables/JSON.

Why a fresh subprocess per configuration: a process's peak RSS (VmHWM) only grows, and `ru_maxrss` of a
child inherits the parent's peak across fork/exec (docs/ALGORITHM.md section 6). Each child reads its
own VmHWM after restarting the counter with `/proc/self/clear_refs`; on a GPU it reads
`torch.cuda.max_memory_allocated` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ProgressCallback, TrainerCallback

from qloraga import memory
from qloraga.loading import model_device

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TMP = RESULTS / "tmp"  # random checkpoints and other rebuildable files (git-ignored)
RESULT_MARKER = "BENCH_RESULT "
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama shapes. The vocabulary of the CPU shapes is small on purpose: embeddings and head then take ~4% of
# the parameters, as in Llama-2-7B, so the memory ratios are not dominated by the (unquantized) embeddings.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=2, vocab_size=256),
    "small": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8,
                  num_hidden_layers=16, vocab_size=4096),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                   num_hidden_layers=16, vocab_size=4096),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000),
}


# ----------------------------------------------------------------------------------------------- models


def llama_config(shape: str, layers: int | None = None, max_positions: int = 4096):
    """A `LlamaConfig` of a named shape (Llama-2's norms, rope and init), optionally with another depth."""
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    return LlamaConfig(**dims, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def count_params(config) -> dict[str, int]:
    """Parameters of a config's model, the library's weightless skeleton: total and inside decoder-block linears."""
    from qloraga.model_source import model_skeleton

    model = model_skeleton(config)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ".layers." in f".{n}")
    return {"total": total, "block_linear": linear}


def write_random_checkpoint(config, path: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Save a random bf16 checkpoint one decoder block per shard, never holding the whole model.

    Names and shapes come from the library's weightless skeleton (`model_skeleton`); matrices are
    N(0, initializer_range), norms are ones, as `from_config` would make them. Peak memory is one block, so a
    7B checkpoint can be written on a 16 GB machine and then loaded (and quantized tensor by tensor) by
    `qloraga.load_model`.
    """
    from safetensors.torch import save_file

    from qloraga.model_source import model_skeleton

    meta = model_skeleton(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"layers.{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "other"
        groups.setdefault(key, []).append(name)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, key in enumerate(sorted(groups)):
        tensors = {}
        for name in groups[key]:
            shape = shapes[name]
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.float32, device=device)
                t.normal_(0.0, config.initializer_range, generator=generator)
                t = t.to(torch.bfloat16).cpu()  # convert where it was drawn (the GPU), copy half the bytes
            tensors[name] = t
            total += t.nbytes
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    return path


def random_model(shape: str, layers: int | None = None, seed: int = 0, device: str = "cpu") -> Path:
    """Folder of a random bf16 checkpoint of `shape` (made once under bench/results/tmp, then reused)."""
    config = llama_config(shape, layers)
    path = TMP / "models" / f"{shape}-L{config.num_hidden_layers}-seed{seed}"
    if not (path / "config.json").exists():
        write_random_checkpoint(config, path, seed=seed, device=device)
    return path


def random_batches(n: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """`n` batches of uniform random tokens, every position a label (same seed, same batches everywhere)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def load(path: str | Path, four_bit: bool, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The base model through `qloraga.load_model` (NF4 + bf16 compute, or plain bf16), on the GPU if any."""
    import qloraga

    return qloraga.load_model(str(path), load_in_4bit=four_bit, dtype=dtype)


def materialize(model: nn.Module) -> None:
    """Copy memory-mapped parameters into the process's own memory, as loading onto a GPU would.

    safetensors are memory-mapped: a bf16 model's weights would otherwise count in RSS only once touched
    (and the file pages twice if a method rewrites the weights). A no-op for tensors already on a GPU.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    release_memory()


device_of = model_device  # the library's: where a model's inputs go


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def touch(model: nn.Module, batch: dict) -> None:
    """One inference forward: pages in every weight and runs lazy set-up before a measured phase."""
    was_training = model.training
    model.eval()
    model(**to_device(batch, device_of(model)), use_cache=False)
    model.train(was_training)


# ---------------------------------------------------------------------------------------------- methods


def qloraga_model(model: nn.Module, batches: list[dict], *, r: int, init_memory_gb: float = 4.0,
                  chunk_blocks: int | None = None, adapter_dtype: str = "bfloat16", seed: int = 0,
                  svd_niter: int | None = None, **settings):
    """(a) this project: LoRA-GA on the model as loaded (4-bit or bf16), chunked gradient estimate
    (or any other `QLoraGAConfig` setting, e.g. `estimator="sketch"`)."""
    import qloraga

    config = qloraga.QLoraGAConfig(r=r, lora_alpha=2 * r, init_memory_gb=init_memory_gb, chunk_blocks=chunk_blocks,
                                   adapter_dtype=adapter_dtype, seed=seed, svd_niter=svd_niter, progress=False,
                                   **settings)
    return qloraga.get_qloraga_model(model, config, batches)


def peft_loraga_model(model: nn.Module, batches: list[dict], *, r: int):
    """(b) PEFT 0.21's LoRA-GA as its docs intend: `preprocess_loraga(model, config, train_step)`, then
    `get_peft_model`. It refuses quantized layers, so the model is bf16 (its only option)."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, lora_dropout=0.0,
                        init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), task_type="CAUSAL_LM")
    device = device_of(model)

    def train_step() -> None:
        for batch in batches:
            model(**to_device(batch, device), use_cache=False).loss.backward()

    preprocess_loraga(model, config, train_step)
    return get_peft_model(model, config)


def plain_lora_model(model: nn.Module, *, r: int, adapter_dtype: str = "float32"):
    """(c) plain (Q)LoRA with PEFT: Kaiming A, B = 0, the same target layers. PEFT keeps the adapters in
    fp32 by default (`autocast_adapter_dtype`); `adapter_dtype="bfloat16"` keeps them in the model's dtype."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "float32")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (no weight decay): the method comparisons' optimizer (`train_step`)."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               autocast: bool = False) -> float:
    """One step: forward, backward, clip to norm 1, optimizer step. Returns the loss.

    Only for the method comparisons (convergence.py and the scripts built on it), whose rows include methods
    the library's Trainer does not build (PEFT's LoRA-GA, LoftQ, EVA, full fine-tuning) and must all take the
    same steps on the same batches; a benchmark of qloraga's own training trains with `library_trainer`."""
    model.train()
    device = device_of(model)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**to_device(batch, device), use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --------------------------------------------------------------------------------- the library's Trainer


def examples(batches: list[dict]) -> list:
    """The rows of `batches` as the library's `Example`s, which its Trainer collates back (`qloraga.batches`)."""
    from qloraga.batches import Example

    return [Example(ids.tolist(), labels.tolist())
            for b in batches for ids, labels in zip(b["input_ids"], b["labels"], strict=True)]


class StepTimer(TrainerCallback):
    """Each optimizer step's seconds inside `Trainer.train` (forward, backward, clipping, optimizer step and the
    library's step callbacks; a GPU is synchronized at both ends), and each logged training loss."""

    def __init__(self):
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def library_trainer(model: nn.Module, batches: list[dict], *, lr: float = 1e-4, **settings):
    """The Trainer `qloraga finetune` trains with (`qloraga.training.build_trainer`: its optimizer, schedule,
    clipping at norm 1 and callbacks) on `batches`' rows, one batch's worth per optimizer step, without gradient
    checkpointing unless `settings` (other `RunConfig` settings, e.g. `optim`) ask for it. It logs every step
    (to its metrics.jsonl, not the console), evaluates nothing and writes its checkpoint at the end of each
    `train_steps` into a folder of its own under bench/results/tmp, removed with it; `trainer.step_timer` records
    the steps."""
    from qloraga.batches import Collator
    from qloraga.config import RunConfig
    from qloraga.training import build_trainer

    settings = {"gradient_checkpointing": False, **settings}
    cfg = RunConfig(init="lora", lr=lr, batch_size=len(batches[0]["input_ids"]), grad_accum=1, max_steps=1,
                    logging_steps=1, save_steps=10**9, eval_steps=0, report_to="none", **settings)
    (TMP / "trainers").mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=TMP / "trainers"))
    trainer = build_trainer(model, examples(batches), Collator(pad_token_id=0), cfg, out)
    weakref.finalize(trainer, shutil.rmtree, out, True)
    trainer.remove_callback(ProgressCallback)  # no progress bar nor log line per call and step in the bench output
    trainer.step_timer = StepTimer()
    trainer.add_callback(trainer.step_timer)
    return trainer


def train_steps(trainer, steps: int, batches: list[dict] | None = None) -> list[float]:
    """`steps` optimizer steps of a `library_trainer` through `Trainer.train` (on `batches`' rows from now on,
    where given: as many rows per step as before); each step's seconds. Every call restarts the learning-rate
    schedule over its steps and keeps the optimizer's state."""
    from qloraga.training import dataset

    if batches is not None:
        if len(batches[0]["input_ids"]) != trainer.args.per_device_train_batch_size:
            raise ValueError(f"train_steps: batches of {len(batches[0]['input_ids'])} rows for a trainer built on "
                             f"{trainer.args.per_device_train_batch_size}: build another library_trainer.")
        trainer.train_dataset = dataset(examples(batches))
    trainer.args.max_steps = steps
    done = len(trainer.step_timer.seconds)
    trainer.train()
    return trainer.step_timer.seconds[done:]


# ----------------------------------------------------------------------------------------------- memory


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so they are not silently reused."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def restart_peak() -> None:
    """Restart the peak counter: the CUDA allocator's, or this process's VmHWM (`echo 5 > clear_refs`)."""
    release_memory()
    if torch.cuda.is_available():
        memory.reset_peak()
    else:
        Path("/proc/self/clear_refs").write_text("5")


# The readings are qloraga's own: allocated memory on a GPU, VmRSS / VmHWM (read in this process) on a CPU.
proc_status_gb = memory.proc_status_gb
current_gb = memory.current_memory_gb
peak_gb = memory.peak_memory_gb  # since `restart_peak`


def memory_kind() -> str:
    return "GPU max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM) of a fresh process"


def measure(phase: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run `phase` with the peak counter restarted: (its result, {before_gb, peak_gb, seconds}), and on a GPU
    also `reserved_gb`, the caching allocator's peak reservation (what the card must hold)."""
    restart_peak()
    before = current_gb()
    start = time.perf_counter()
    result = phase()
    extra = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        extra["reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    seconds = time.perf_counter() - start
    return result, {"before_gb": before, "peak_gb": peak_gb(), "seconds": seconds, **extra}


# -------------------------------------------------------------------------------- subprocess harness


# A fixed mmap threshold: glibc serves tensors over 64 KiB from mmap and unmaps them when freed, so VmHWM
# follows live tensors (like a GPU's max_memory_allocated) instead of heap fragmentation (seen: +60% on the
# accumulators of a chunked init without it).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def reexec_with_malloc_env() -> None:
    """On a CPU, restart this script under `MALLOC_ENV` unless it already runs under it (glibc reads it at start)."""
    if not torch.cuda.is_available() and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def setup_child(threads: int | None = None) -> None:
    """Threads from `BENCH_THREADS` (default 1: on a shared machine two OpenMP threads that wait for each
    other's core run small ops up to 7x slower than one thread), and no denormals."""
    torch.set_num_threads(threads or int(os.environ.get("BENCH_THREADS", "1")))
    torch.set_flush_denormal(True)


def run_child(script: Path, spec: dict, inprocess: Callable[[dict], dict] | None = None,
              timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run `script --child SPEC` in a fresh interpreter and return the dict it printed after the marker.

    With `inprocess`, call it on `spec` in this process instead: only for `--tiny` smoke runs, whose
    figures mean nothing and which must not pay an interpreter start (~10 s) per configuration.
    `env`: more environment variables for the child (e.g. a PYTHONPATH to an older qloraga).
    """
    if inprocess is not None:
        return json.loads(json.dumps(inprocess(spec)))
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", **MALLOC_ENV, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"{script.name} child {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def serve_child(args: argparse.Namespace, child: Callable[[dict], dict]) -> bool:
    """If this process was started by `run_child`, run the child and print its result; True if so."""
    if not args.child:
        return False
    print(RESULT_MARKER + json.dumps(child(json.loads(args.child))), flush=True)
    return True


def parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny shape (the smoke test)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; tables quote the median")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


# -------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes, its GPU work included (synchronizes before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rotated(names: list[str], i: int) -> list[str]:
    """The order of round `i` when configurations take turns: `names` started at entry `i` (mod its length)."""
    return names[i % len(names):] + names[:i % len(names)]


# -------------------------------------------------------------------------------------------- results


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    """The machine and library versions, for the results' header."""
    import bitsandbytes
    import peft
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_gb = float("nan")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        mem_gb = int(meminfo.read_text().split()[1]) / 2**20
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
        "threads per process": int(os.environ.get("BENCH_THREADS", "1")),
    }


def sha256(path: Path) -> str:
    """First 16 hex digits of a file's SHA-256 (which base model a result used)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (dicts) restricted to `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(out: Path, name: str, payload: dict) -> Path:
    """Write `name.json` with the payload, the command that produced it and the machine."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"command": command(), "machine": machine(), **payload}, indent=1, default=str) + "\n")
    return path


def plot(out: Path, name: str, draw: Callable[[Any], None], figsize: tuple[float, float] = (6.4, 4.2)) -> Path:
    """Save a PNG drawn by `draw(fig)` (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=figsize)
    draw(fig)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
