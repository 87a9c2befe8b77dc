"""The fine-tuning recipe, top to bottom: load -> data -> evaluate -> LoRA-GA init -> train -> evaluate -> export."""

from __future__ import annotations

import dataclasses
import shutil
import time
from datetime import datetime
from pathlib import Path

import yaml
from accelerate import PartialState
from transformers import AutoTokenizer, set_seed

from qloraga import distributed
from qloraga.adapters import get_lora_model, get_qloraga_model
from qloraga.batches import Collator, gradient_batches, pack, tokenize
from qloraga.config import DEMO_DIR, DEMO_EVAL, DEMO_MODEL, DEMO_TRAIN, RunConfig  # noqa: F401 (DEMO_DIR: API)
from qloraga.errors import RunError, RunInterrupted, TrainingDiverged
from qloraga.evaluation import SHORT_ANSWER_FORMATS, SHORT_ANSWER_TOKENS, exact_match, held_out_loss
from qloraga.export import export_adapter, export_merged
from qloraga.formats import prepare_tokenizer, resolve_format
from qloraga.io import save_json, save_text
from qloraga.loading import load_base, model_device
from qloraga.memory import memory_kind, peak_memory_gb
from qloraga.model_source import model_source
from qloraga.preflight import check_run
from qloraga.prequantized import weights_description
from qloraga.runs import ORIGINAL_ADAPTER, last_checkpoint, record_frame
from qloraga.training import (
    GracefulInterrupt,
    StopOnNonFiniteLoss,
    build_trainer,
    finish_loggers,
    plot_loss,
)


def say(message: str) -> None:
    if distributed.is_main():
        print(f"[qloraga] {message}", flush=True)


def resolve_demo(cfg: RunConfig) -> RunConfig:
    """Replace the `demo` placeholders with the embedded model and data."""
    changes = {}
    if cfg.model == "demo":
        changes["model"] = str(DEMO_MODEL)
    if cfg.dataset == "demo":
        changes["dataset"] = str(DEMO_TRAIN)
        if cfg.eval_dataset is None:
            changes["eval_dataset"] = str(DEMO_EVAL)
    return dataclasses.replace(cfg, **changes)


def default_output_dir(cfg: RunConfig) -> Path:
    name = Path(cfg.model).name if cfg.model != str(DEMO_MODEL) else "demo"
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_output_dir(out: Path, cfg: RunConfig) -> None:
    """Refuse to clobber a previous run unless asked to overwrite or to resume it."""
    exists = out.exists() and any(out.iterdir())
    if cfg.resume:
        if not exists:
            raise RunError(f"--resume: {out} holds no run to resume. Drop --resume to start a new run.")
        return
    if exists:
        if not cfg.overwrite:
            raise RunError(f"Output directory {out} already holds a run: pass --overwrite to replace it, "
                             "--resume to continue it, or choose another --output-dir.")
        say(f"--overwrite: deleting {out} (the previous run and everything in it: "
            f"{', '.join(sorted(p.name for p in out.iterdir()))})")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_config(cfg: RunConfig, out: Path, notes: list[str] = ()) -> None:
    """The resolved settings (`qloraga finetune --config OUT/config.yaml` runs them again), with where the
    preset and learning rate came from as comments."""
    header = "".join(f"# {line}\n" for line in notes)
    save_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False), out / "config.yaml")


def evaluate(model, tokenizer, eval_examples, eval_records, collator, cfg: RunConfig) -> dict[str, float | None]:
    loss = held_out_loss(model, eval_examples, collator, batch_size=cfg.batch_size * 2)
    accuracy = exact_match(model, tokenizer, eval_records, cfg.dataset_format, max_samples=cfg.eval_samples)
    return {"eval_loss": loss, "accuracy": accuracy}


def describe(metrics: dict[str, float | None]) -> str:
    acc = metrics["accuracy"]
    return f"held-out loss {metrics['eval_loss']:.4f}" + ("" if acc is None else f", exact match {acc:.1%}")


def finetune(cfg: RunConfig, notes: list[str] = ()) -> Path:
    """Run one fine-tuning job and return its output folder. `notes`: where settings came from, said first
    and kept in config.yaml."""
    cfg = resolve_demo(cfg.validate())
    for line in notes:
        say(line)
    PartialState()  # joins the process group under torchrun / accelerate launch; nothing in one process
    checked = check_run(cfg)  # model config, targets, rank, data fields: before any weight, token or output file
    # The format is recorded as detected: chat, evaluate and the Modelfile render prompts as training did.
    cfg = dataclasses.replace(cfg, dataset_format=resolve_format(checked.train_records, cfg.dataset_format))
    for note in checked.notes:
        say(f"note: {note}")
    main = distributed.is_main()  # only rank 0 writes files, logs and evaluates
    out = Path(distributed.broadcast_object(str(cfg.output_dir or default_output_dir(cfg))))
    if main:
        prepare_output_dir(out, cfg)
        write_config(cfg, out, notes)
        record_frame(out, checked.train_records, cfg.dataset_format)  # what chat puts a message in
    distributed.barrier()
    set_seed(cfg.seed)
    start = time.perf_counter()

    # Data (read and checked above).
    tokenizer = AutoTokenizer.from_pretrained(model_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
    for fix in prepare_tokenizer(tokenizer, cfg.chat_template):
        say(f"note: {fix}")
    train_records, eval_records = checked.train_records, checked.eval_records
    train_examples, report = tokenize(train_records, cfg.dataset_format, tokenizer, cfg.seq_len)
    eval_examples, _ = tokenize(eval_records, cfg.dataset_format, tokenizer, cfg.seq_len)
    say(f"data: {report.examples} training examples ({report.truncated} truncated to --seq-len {cfg.seq_len}, "
        f"{report.fully_masked} dropped with no response token), {len(eval_examples)} held out")
    if cfg.packing:
        train_examples = pack(train_examples, cfg.seq_len)
        say(f"packing: {len(train_examples)} sequences of up to {cfg.seq_len} tokens")
    collator = Collator(tokenizer.pad_token_id)

    # Model, and where it starts.
    model = load_base(cfg)
    say(f"model: {cfg.model} ({weights_description(cfg, checked.model_config)})")
    if main:
        before = evaluate(model, tokenizer, eval_examples, eval_records, collator, cfg)
        say(f"before fine-tuning: {describe(before)}")
        if before["accuracy"] is None and cfg.eval_samples:
            say(f"note: no exact-match score; it is computed on {'/'.join(SHORT_ANSWER_FORMATS)} data whose answers "
                f"are at most {SHORT_ANSWER_TOKENS} tokens")

    # Adapters: LoRA-GA or LoRA-One (gradient estimated on the first training batches), or plain LoRA.
    if cfg.init != "lora" or cfg.lora_ga.quant_error != "off":  # plain LoRA on the fit: its pass computes H
        alone = cfg.init == "lora"  # the pass's gradient step goes unused: LoRA-One's is the cheapest (top r)
        lora_ga = dataclasses.replace(cfg.lora_ga, cache_dir=cfg.lora_ga.cache_dir or str(out / "lora_ga_cache"),
                                      progress=cfg.lora_ga.progress and main,
                                      **({"method": "lora-one"} if alone else {}))
        batches = gradient_batches(train_examples, cfg.ga_batches, cfg.batch_size, collator)
        model = get_qloraga_model(model, lora_ga, batches, step=not alone)
        say(model.qloraga_report.summary())
    else:
        model = get_lora_model(model, cfg.lora_ga)
        say("plain LoRA init (B=0)")

    # Training.
    trainer = build_trainer(model, train_examples, collator, cfg, out, eval_examples)  # every rank: eval is sharded
    resume_from = last_checkpoint(out) if cfg.resume else None
    if cfg.resume:
        say(f"resuming from {resume_from}" if resume_from else "no checkpoint yet: training from the start")
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        nan_guard = trainer.pop_callback(StopOnNonFiniteLoss)
        if nan_guard.bad_step is not None:
            raise TrainingDiverged(f"The weights became NaN/inf at step {nan_guard.bad_step}; training stopped. The "
                                   f"last good checkpoint is {last_checkpoint(out)}: lower --lr and --resume.")
        if trainer.pop_callback(GracefulInterrupt).requested:
            raise RunInterrupted(f"checkpoint written to {last_checkpoint(out)}")
        if not main:
            return out
        # The one final evaluation (the Trainer skips its own at the last step): logged as the Trainer logs its
        # held-out loss, so metrics.jsonl, loss.png and the loggers end with it.
        after = evaluate(model, tokenizer, eval_examples, eval_records, collator, cfg)
        if eval_examples:
            trainer.log({"eval_loss": after["eval_loss"]})
    finally:
        finish_loggers(cfg.report_to)

    # Results and exports.
    say(f"after fine-tuning: {describe(after)}")
    export_adapter(model, out / "adapter", tokenizer=tokenizer)
    if cfg.lora_ga.quant_error != "off":  # the 4-bit base has the error the fit recovers; the original has none
        export_adapter(model, out / ORIGINAL_ADAPTER, tokenizer=tokenizer, original=True)
        say(f"{ORIGINAL_ADAPTER}/: the adapter for the unquantized original weights (without the quantization-error "
            "fit, which those weights do not need); adapter/ is for the 4-bit base")
    if cfg.merge:
        export_merged(model, out / "merged", tokenizer=tokenizer)
    plotted = plot_loss(out / "metrics.jsonl", out / "loss.png")
    device = model_device(model)  # measured where the weights are
    save_json({"before": before, "after": after, "seconds": time.perf_counter() - start,
               "peak_memory_gb": peak_memory_gb(device), "memory_kind": memory_kind(device),
               "steps": trainer.state.global_step}, out / "results.json")
    say(f"done in {time.perf_counter() - start:.0f} s. Outputs in {out}/: adapter/ (PEFT LoRA adapter), "
        f"checkpoints/ (for --resume), metrics.jsonl, {'loss.png, ' if plotted else ''}config.yaml, "
        f"results.json{', merged/' if cfg.merge else ''}")
    return out

