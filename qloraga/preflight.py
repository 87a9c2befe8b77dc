"""What can be checked before any weight is loaded, any data tokenized or any output written.

From the resolved configuration, the model's config.json and the dataset's records: the model is a causal LM,
the target modules exist and the rank fits the smallest of them (on a skeleton of the model built on the meta
device: its module names and shapes, no memory), the data files read, their format is known and every record
has the fields it needs. Each message names the flag or YAML key to change. The same checks run again where
the work happens (`get_qloraga_model`, `tokenize`), for library users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from qloraga.adapters import check_target_rank
from qloraga.config import QUANT_STORAGE, ConfigError, RunConfig, option
from qloraga.data import is_local, read_records, split
from qloraga.errors import DataError
from qloraga.formats import RESPONSE_FIELDS, check_record, count_empty_responses, resolve_format
from qloraga.model_source import causal_lm_config, model_skeleton
from qloraga.prequantized import check_quant_storage, prequantized
from qloraga.presets import MODEL_TYPE_PRESETS
from qloraga.targets import find_target_layers
from qloraga.training import LOGGER_PACKAGES, liger_installed, liger_model_types, logger_installed


@dataclass
class Checked:
    """What the checks read, for the run to reuse: the model's config and the records, split; `notes`: what the
    run should say about them (records with an empty response)."""

    model_config: PretrainedConfig
    train_records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def check_targets(cfg: RunConfig, config: PretrainedConfig) -> None:
    """`lora_ga.target_modules` select linear layers of this model, and the rank fits the smallest of them."""
    skeleton = model_skeleton(config, cfg.trust_remote_code)
    if skeleton is None:
        return
    try:
        targets = find_target_layers(skeleton, cfg.lora_ga.target_modules)
    except ValueError as exc:
        raise ConfigError(f"{option('lora_ga.target_modules')}: {exc}") from exc
    r = cfg.lora_ga.r
    try:  # LoRA-GA takes 2r singular directions of each gradient; LoRA-One and plain LoRA r
        check_target_rank(targets, r, 2 * r if cfg.init == "lora-ga" else r)
    except ValueError as exc:
        raise ConfigError(f"{option('lora_ga.r')} {r} does not fit this model: {exc}") from exc


def check_records(records: list[dict[str, Any]], fmt: str, source: str, flag: str) -> str | None:
    """The format is known (or detected from the first record), every record has the fields it needs and not
    every response is empty; returns a note when some are."""
    record_fmt = None
    try:
        record_fmt = resolve_format(records, fmt)
        for index, record in enumerate(records):
            check_record(record, record_fmt, index)
        empty = count_empty_responses(records, record_fmt)
    except DataError as exc:
        detected = (f" (format {record_fmt!r}, detected from the first record; --dataset-format sets it)"
                    if fmt == "auto" and record_fmt else "")
        raise DataError(f"{flag} {source}: {exc}{detected}") from exc
    if not empty:
        return None
    return (f"{flag} {source}: {empty} of {len(records)} records have an empty {RESPONSE_FIELDS[record_fmt]}; "
            "they teach only the end-of-text token")


def check_run(cfg: RunConfig) -> Checked:
    """Every check that needs no weights and no tokenizer; raises a ConfigError or DataError naming the setting."""
    check_report_to(cfg)
    check_output_dir(cfg)
    config = causal_lm_config(cfg.model, cfg.trust_remote_code)
    check_quant_storage(prequantized(config), QUANT_STORAGE.get(cfg.quant_storage))
    check_packing(cfg, config)
    check_liger(cfg, config)
    check_targets(cfg, config)
    check_splits(cfg)
    records = read_records(cfg.dataset, cfg.dataset_split)
    notes = [check_records(records, cfg.dataset_format, cfg.dataset, "--dataset")]
    if cfg.eval_dataset or cfg.eval_dataset_split:
        source = cfg.eval_dataset or cfg.dataset
        eval_records = read_records(source, cfg.eval_dataset_split or "train")
        notes.append(check_records(eval_records, cfg.dataset_format, source,
                                   "--eval-dataset" if cfg.eval_dataset else "--dataset"))
    else:
        records, eval_records = split(records, cfg.eval_split, cfg.seed)
    return Checked(config, records, eval_records, [n for n in notes if n])


def check_output_dir(cfg: RunConfig) -> None:
    """`--output-dir` is a folder, or can become one (no file in the way)."""
    if cfg.output_dir is None:
        return
    path = Path(cfg.output_dir).expanduser()
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{option('output_dir')} {cfg.output_dir}: {blocking} is a file, not a folder. Choose "
                          "another --output-dir (or move the file).")


def check_packing(cfg: RunConfig, config: PretrainedConfig) -> None:
    """Packed samples stay apart only where the model builds its mask from the position ids (transformers'
    `masking_utils`): the families with a preset, each tested in tests/test_packing.py. Others (Falcon, Bloom,
    MPT, remote code) would let the samples of a row attend to each other, silently."""
    custom = cfg.trust_remote_code and getattr(config, "auto_map", None)
    if cfg.packing and (config.model_type not in MODEL_TYPE_PRESETS or custom):
        kind = "remote code" if custom else f"model_type {config.model_type!r}"
        raise ConfigError(f"{option('packing')}: this model ({kind}) is not known to keep packed samples apart, so "
                          f"they would attend to each other. Drop --packing, or use a family with a preset "
                          f"({', '.join(sorted(MODEL_TYPE_PRESETS))}).")


def check_liger(cfg: RunConfig, config: PretrainedConfig) -> None:
    """`--liger` only where its kernels run: a CUDA device (they are Triton code), the liger-kernel package, and a
    family it patches (elsewhere transformers would only warn and train unfused)."""
    if not cfg.liger:
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{option('liger')}: Liger's kernels run on CUDA GPUs only, and this machine has no CUDA "
                          "device. Drop --liger.")
    if not liger_installed():
        raise ConfigError(f"{option('liger')}: the liger-kernel package (0.3 or later) is not installed. Install it "
                          "(pip install liger-kernel) or drop --liger.")
    families = liger_model_types()
    if config.model_type not in families:
        raise ConfigError(f"{option('liger')}: Liger has no kernels for model_type {config.model_type!r} (it patches "
                          f"{', '.join(sorted(families))}). Drop --liger.")


def check_report_to(cfg: RunConfig) -> None:
    """A logger asked for by name is installed (transformers would only fail once the model is loaded)."""
    if cfg.report_to in LOGGER_PACKAGES and not logger_installed(cfg.report_to):
        raise ConfigError(f"{option('report_to')} {cfg.report_to}: the {cfg.report_to} package is not installed. "
                          f"Install it (pip install {cfg.report_to}) or choose none.")


def check_splits(cfg: RunConfig) -> None:
    """Split names apply to hub datasets only: on a local file they would silently read the file again."""
    if cfg.dataset_split != "train" and is_local(cfg.dataset):
        raise ConfigError(f"{option('dataset_split')} {cfg.dataset_split!r}: --dataset {cfg.dataset} is a local "
                          "file, which has no splits. Drop it, or give a hub dataset NAME[:CONFIG].")
    if cfg.eval_dataset_split and is_local(cfg.eval_dataset or cfg.dataset):
        flag = "--eval-dataset" if cfg.eval_dataset else "--dataset"
        raise ConfigError(f"{option('eval_dataset_split')} {cfg.eval_dataset_split!r}: {flag} "
                          f"{cfg.eval_dataset or cfg.dataset} is a local file, which has no splits. Drop it (the "
                          "held-out set is then --eval-dataset, or --eval-split of --dataset).")
