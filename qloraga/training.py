"""Training on transformers' `Trainer`: arguments from a `RunConfig`, metrics.jsonl, loss curve, resume."""

from __future__ import annotations

import importlib.util
import json
import signal
import threading
from dataclasses import asdict
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from qloraga.batches import Collator, Example
from qloraga.config import SCALED_OPTIMIZERS, RunConfig, resolve_optim
from qloraga.errors import RunInterrupted
from qloraga.io import atomic_file
from qloraga.optim import scaled_optimizer

# Held-out examples evaluated every `eval_steps` (the full held-out set is scored before and after training).
EVAL_DURING_TRAINING = 500


def parse_line(line: str) -> dict | None:
    """A metrics record, or None for a blank line or one cut short by a crash."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records, without a line cut short by a crash; none when the file is not there yet."""
    if not path.exists():
        return []
    return [r for line in path.read_text().splitlines() if (r := parse_line(line)) is not None]


class MetricsLog(TrainerCallback):
    """Appends every Trainer log record to `metrics.jsonl`; on resume, drops records past the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.exists() and state.is_world_process_zero:
            kept = [line for line in self.path.read_text().splitlines()
                    if (record := parse_line(line)) is not None and record.get("step", 0) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one device sync rather than one per tensor:
    each tensor's largest |x| in one fused call (a max cannot overflow; NaN and inf carry through), checked
    together."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors:
        return True
    peaks = torch._foreach_norm(tensors, float("inf"))
    device = peaks[0].device
    return bool(torch.isfinite(torch.stack([p.float().to(device) for p in peaks])).all())


class StopOnNonFiniteLoss(TrainerCallback):
    """Checks the trainable weights after every optimizer step; at the first NaN/inf it stops training
    without saving, so the newest checkpoint is the last good one."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if not all_finite(trainable):
            self.bad_step = state.global_step
            control.should_training_stop = True
            control.should_save = False


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, write a checkpoint, stop. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise RunInterrupted("a second Ctrl-C stopped the run at once")
        self.requested = True
        print("\n[qloraga] Ctrl-C: saving a checkpoint after this step (press again to stop at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class NoFinalEvaluation(TrainerCallback):
    """No held-out evaluation by the Trainer at the last step: the recipe scores the whole held-out set right
    after training (loss and exact match) and logs that loss, so the Trainer's would score it twice."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = False


# The packages transformers' reporting callbacks can write with, per `report_to` name.
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def logger_installed(name: str) -> bool:
    return any(importlib.util.find_spec(package) for package in LOGGER_PACKAGES.get(name, ()))


def liger_installed() -> bool:
    """liger-kernel in a version transformers' Trainer takes (`use_liger_kernel`: 0.3 or later)."""
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()


def liger_model_types() -> set[str]:
    """The `model_type`s Liger patches (import only where it is installed: it loads Triton)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def resolve_report_to(name: str) -> str:
    """transformers' `report_to`: auto is tensorboard where it is installed (preflight checks the others)."""
    if name == "auto":
        return "tensorboard" if logger_installed("tensorboard") else "none"
    return name


def training_arguments(cfg: RunConfig, checkpoint_dir: Path, evaluating: bool = False) -> TrainingArguments:
    """`evaluating`: held-out loss every `cfg.eval_steps` steps (there is a held-out set and eval_steps > 0)."""
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio of the total steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        optim=resolve_optim(cfg.optim),
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=cfg.liger,  # the Trainer patches the base under the PEFT model (preflight.check_liger)
        remove_unused_columns=False,
        # Trainer sets the model's config.use_cache to this: no KV cache in training, which packed rows need
        # (transformers builds their per-sample mask from the position ids only when there is no cache).
        use_cache=False,
        label_names=["labels"],
        report_to=resolve_report_to(cfg.report_to),
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg.eval_steps if evaluating else None,
        per_device_eval_batch_size=cfg.batch_size,  # beside the training state: no larger than a training batch
        prediction_loss_only=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def finish_loggers(report_to: str) -> None:
    """End the wandb run: transformers leaves it open, and a second run in the same process would log into it."""
    if resolve_report_to(report_to) == "wandb":
        import wandb

        wandb.finish()


def dataset(examples: list[Example]) -> datasets.Dataset:
    """The examples as rows the `Collator` reads back (packed rows keep their position ids)."""
    return datasets.Dataset.from_list([{k: v for k, v in asdict(e).items() if v is not None} for e in examples])


def build_trainer(model: nn.Module, examples: list[Example], collator: Collator, cfg: RunConfig,
                  out_dir: Path, eval_examples: list[Example] | None = None) -> Trainer:
    """The recipe's Trainer; with `eval_examples` (and `cfg.eval_steps` > 0) it logs their loss during training."""
    evaluating = bool(eval_examples) and cfg.eval_steps > 0
    optimizer = (scaled_optimizer(model, cfg.optim, cfg.lr, weight_decay=cfg.weight_decay,
                                  precond_eps=cfg.precond_eps) if cfg.optim in SCALED_OPTIMIZERS else None)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, out_dir / "checkpoints", evaluating),
        optimizers=(optimizer, None),  # None: Trainer builds it (and always the learning-rate schedule)
        train_dataset=dataset(examples),
        eval_dataset=dataset(eval_examples[:EVAL_DURING_TRAINING]) if evaluating else None,
        data_collator=collator,
        callbacks=[MetricsLog(out_dir / "metrics.jsonl"), StopOnNonFiniteLoss(), GracefulInterrupt(),
                   NoFinalEvaluation()],
    )
    return trainer


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Training loss, and held-out loss where it was evaluated, against step, as a PNG; False (and nothing
    written) when matplotlib is missing or nothing was logged."""
    if importlib.util.find_spec("matplotlib") is None or not metrics_path.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series = {label: [(r["step"], r[key]) for r in rows if key in r]
              for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss"))}
    if not series["training loss"]:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True
