"""Training on transformers' `Trainer`: arguments from a `RunConfig`, metrics.jsonl, loss curve, resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from qloraga.config import RunConfig
from qloraga.data import Collator, Example


class MetricsLog(TrainerCallback):
    """Appends every Trainer log record to `metrics.jsonl`; on resume, drops records past the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.exists() and state.is_world_process_zero:
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training at the first NaN/inf loss, so the last good checkpoint stays the newest one."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not torch.isfinite(torch.tensor(float(loss))):
            self.bad_step = state.global_step
            control.should_training_stop = True
            control.should_save = False


def resolve_optim(name: str) -> str:
    if name != "auto":
        return name
    return "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"


def training_arguments(cfg: RunConfig, checkpoint_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        optim=resolve_optim(cfg.optim),
        seed=cfg.seed,
        data_seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def build_trainer(model: nn.Module, examples: list[Example], collator: Collator, cfg: RunConfig,
                  out_dir: Path) -> Trainer:
    train_set = datasets.Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, out_dir / "checkpoints"),
        train_dataset=train_set,
        data_collator=collator,
        callbacks=[MetricsLog(out_dir / "metrics.jsonl"), StopOnNonFiniteLoss()],
    )
    return trainer


def last_checkpoint(out_dir: Path) -> str | None:
    checkpoints = out_dir / "checkpoints"
    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Training loss against step, as a PNG; False (and nothing written) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None or not metrics_path.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*points, strict=True), marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return True
