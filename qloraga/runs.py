"""Open a finished (or interrupted) run folder: its settings, its base as the run loaded it, its adapter.

A run's `adapter/` is already the portable rank-2r PEFT adapter. A checkpoint (`checkpoints/checkpoint-N`,
written by Trainer through PEFT's `save_pretrained`) holds the trainable rank-r `A`, `B` and, for LoRA-GA
runs, the frozen correction buffers `qloraga_A0`, `qloraga_B0`; loaded by plain PEFT it would silently
lack the `-s B0 A0` term. `checkpoint_adapter` rebuilds the corrected rank-2r adapter `[A; A0]`,
`[B, -B0]` (alpha doubled, the same scaling) through `export.adapter.fold_correction`, as a live model's
export does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from qloraga.config import RunConfig
from qloraga.errors import ModelSourceError, RunError
from qloraga.io import save_json, save_tensors
from qloraga.prompt_frame import FRAME_FILE, Frame, detect_frame, frame_from_dict

# What `finetune` writes in a run folder (and merged/ with --merge). `qloraga export` writes merged/ and gguf/
# there too, which a new run in the same folder would delete.
ORIGINAL_ADAPTER = "adapter-original"  # with --quant-error: the adapter for the weights before quantization
RUN_OUTPUTS = ("adapter", ORIGINAL_ADAPTER, "checkpoints", "lora_ga_cache", "metrics.jsonl", "loss.png", "config.yaml",
               "results.json", FRAME_FILE)


@dataclass
class Run:
    """A run folder and its resolved settings."""

    path: Path
    config: RunConfig

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def original_adapter_dir(self) -> Path:
        return self.path / ORIGINAL_ADAPTER

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"checkpoint-{step}"

    def tokenizer(self):
        """The run's tokenizer: the one saved beside its adapter, else its base model's (pad token and chat
        template set as training set them)."""
        from transformers import AutoTokenizer

        from qloraga.formats import prepare_tokenizer
        from qloraga.model_source import model_source

        source = self.adapter_dir if (self.adapter_dir / "tokenizer_config.json").exists() else \
            model_source(self.config.model)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=self.config.trust_remote_code)
        prepare_tokenizer(tokenizer, self.config.chat_template)
        return tokenizer

    def dataset_format(self, default: str = "messages") -> str:
        """The format the run trained on, in which chat, evaluate and the Modelfile render prompts: config.yaml
        records it; for a run that recorded `auto`, detected again from its data files, else `default`."""
        from qloraga.config import DEMO_TRAIN
        from qloraga.data import is_local, read_records
        from qloraga.errors import DataError
        from qloraga.formats import resolve_format

        if self.config.dataset_format != "auto":
            return self.config.dataset_format
        for source in (self.config.dataset, self.config.eval_dataset):
            source = str(DEMO_TRAIN) if source == "demo" else source
            if source is None or not is_local(source):  # no hub download to learn a format
                continue
            try:
                return resolve_format(read_records(source), "auto")
            except DataError:
                continue
        return default

    def prompt_frame(self) -> Frame | None:
        """The frame every training prompt of a prompt-completion run shares (`prompt_frame.py`), which chat, the
        web page and the Modelfile put a message in. Read from the run folder's record; a run without one gets
        it from its local training file, recorded then (a hub dataset is not downloaded for it: no frame)."""
        from qloraga.config import DEMO_TRAIN
        from qloraga.data import is_local, read_records

        if self.dataset_format() != "prompt-completion":
            return None
        record = self.path / FRAME_FILE
        if record.exists():
            return frame_from_dict(json.loads(record.read_text()))
        source = str(DEMO_TRAIN) if self.config.dataset == "demo" else self.config.dataset
        if not is_local(source) or not Path(source).expanduser().exists():
            return None
        return record_frame(self.path, read_records(source), "prompt-completion")


def record_frame(run_dir: str | os.PathLike, records: list[dict], fmt: str) -> Frame | None:
    """The frame the prompts of `fmt` training `records` share (prompt-completion only), recorded in the run
    folder for chat, the web page and the Modelfile (`finetune` records it; older runs when first asked)."""
    frame = detect_frame([str(r.get("prompt", "")) for r in records]) if fmt == "prompt-completion" else None
    with contextlib.suppress(OSError):  # a read-only run folder: detected again next time
        save_json(frame.to_dict() if frame else {"prefix": "", "suffix": ""}, Path(run_dir) / FRAME_FILE)
    return frame


def open_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    config_file = path / "config.yaml"
    if not config_file.exists():
        raise RunError(f"{path} is not a qloraga run folder: it has no config.yaml (give the "
                       "--output-dir of scripts/finetune.py).")
    return Run(path, RunConfig.from_dict(yaml.safe_load(config_file.read_text())))


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """The complete checkpoints of a run folder by step, oldest first (a SIGKILL during a save leaves an
    incomplete one, which is not listed)."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and is_complete(p)]
    return {int(p.name.split("-")[-1]): p for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]))}


def last_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint of a run, for `--resume`."""
    found = checkpoints(run_dir)
    return str(found[max(found)]) if found else None


def available_checkpoints(run: Run) -> list[int]:
    return list(checkpoints(run.path))


def cached_factors(run: Run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA-GA factors `{module: (A0, B0)}` in the run's `lora_ga_cache/` (one fingerprint only)."""
    from qloraga.init.cache import FactorCache

    folder = Path(run.config.lora_ga.cache_dir or run.path / "lora_ga_cache")
    by_key = FactorCache.by_fingerprint(folder)
    if len(by_key) > 1:
        raise RunError(f"{folder} holds factors of {len(by_key)} different initialisations: cannot tell which "
                       "one this checkpoint was trained from.")
    return next(iter(by_key.values()), {})


def corrected_tensors(tensors: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      fit_rows: int = 0) -> dict[str, torch.Tensor]:
    """Rank-r checkpoint tensors (+ correction buffers or `factors`) -> the rank-2r PEFT adapter's tensors;
    `fit_rows`: the buffers' last rows (the quantization-error fit) left out, for the unquantized original."""
    from qloraga.adapters import A0_BUFFER, B0_BUFFER, PEFT_PREFIX
    from qloraga.export.adapter import fold_correction

    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        if f"{module}.{A0_BUFFER}" in tensors:
            a0, b0 = tensors[f"{module}.{A0_BUFFER}"], tensors[f"{module}.{B0_BUFFER}"]
        else:
            short = module.removeprefix(PEFT_PREFIX)
            if short not in factors:
                raise ModelSourceError(f"The checkpoint has no LoRA-GA correction for {short} (no {A0_BUFFER} buffer, "
                                       "and the run's lora_ga_cache/ has no factors for it): without it the "
                                       "checkpoint's adapter is not what was trained. Use the run's final "
                                       "adapter/ instead.")
            a0, b0 = factors[short]
        keep = a0.shape[0] - fit_rows
        out[key], out[f"{module}.lora_B.weight"] = fold_correction(a, tensors[f"{module}.lora_B.weight"], a0[:keep],
                                                                   b0[:, :keep])
    return out


def checkpoint_adapter(run: Run, step: int, out_dir: str | os.PathLike, original: bool = False) -> Path:
    """Write checkpoint `step` of `run` as a PEFT adapter in `out_dir`: rank 2r with the frozen part folded in
    for LoRA-GA runs (its correction) and --quant-error runs (the fit; 3r with both), the checkpoint's own adapter
    for plain LoRA runs. `original`: the adapter for the unquantized original weights, the fit (the buffers'
    last r rows: it is fitted at the uniform rank) left out, as `adapter-original/` is."""
    from qloraga.adapters import A0_BUFFER

    src = run.checkpoint_dir(step)
    if not (src / "adapter_model.safetensors").exists():
        have = available_checkpoints(run)
        raise RunError(f"{src} holds no adapter. Checkpoints of this run: "
                       f"{', '.join(map(str, have)) if have else 'none'}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    corrected = any(k.endswith(A0_BUFFER) for k in tensors)
    if corrected or run.config.init == "lora-ga":
        factors = {} if corrected else cached_factors(run)
        fit_rows = config["r"] if original and run.config.lora_ga.quant_error != "off" else 0
        folded = corrected_tensors(tensors, factors, fit_rows)
        # Rows per trained row: 1 (the fit alone, left out), 2 (LoRA-GA's correction, or LoRA-One's
        # quantization-error fit), 3 (both).
        key = next(k for k in folded if k.endswith(".lora_A.weight"))
        factor = folded[key].shape[0] // tensors[key].shape[0]
        tensors = folded
        config["r"] = factor * config["r"]
        config["lora_alpha"] = factor * config["lora_alpha"]
        for pattern in ("rank_pattern", "alpha_pattern"):  # per-layer ranks (gradient allocation) grow alike
            config[pattern] = {k: factor * v for k, v in (config.get(pattern) or {}).items()}
    save_tensors(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    save_json(config, out_dir / "adapter_config.json")
    return out_dir


def load_run_model(run: Run, checkpoint: int | None = None, base_only: bool = False, dtype: str | None = None,
                   original: bool = False):
    """The run's base loaded as the run loaded it (4-bit or not, its compute dtype, quant storage,
    trust_remote_code), with its final adapter, checkpoint `checkpoint`'s adapter, or none (`base_only`).
    `original` (a --quant-error run): also the adapter for the unquantized original weights, loaded beside as
    `adapters.ORIGINAL` (inactive: the model computes the run's adapter), for the GGUF export.

    Returns `(model, tokenizer)`; the tokenizer is the run's (its pad token and chat template)."""
    from peft import PeftModel

    from qloraga.adapters import ORIGINAL
    from qloraga.loading import load_base

    model = load_base(run.config, dtype)
    tokenizer = run.tokenizer()
    if base_only:
        return model.eval(), tokenizer
    original = original and run.config.lora_ga.quant_error != "off"
    if checkpoint is None:
        if not (run.adapter_dir / "adapter_config.json").exists():
            have = available_checkpoints(run)
            raise RunError(f"{run.path} has no adapter/ (the run did not finish): pass --checkpoint N "
                           f"(checkpoints: {', '.join(map(str, have)) if have else 'none'}).")
        model = PeftModel.from_pretrained(model, run.adapter_dir)  # adapters in fp32, as the presets train them
        if original:
            if not (run.original_adapter_dir / "adapter_config.json").exists():
                raise RunError(f"{run.path} was trained with --quant-error but has no {ORIGINAL_ADAPTER}/ (finetune "
                               "writes it beside adapter/): restore it, or export a checkpoint with --checkpoint N.")
            model.load_adapter(str(run.original_adapter_dir), adapter_name=ORIGINAL)
    else:
        with tempfile.TemporaryDirectory(prefix="qloraga-ckpt-") as tmp:
            model = PeftModel.from_pretrained(model, checkpoint_adapter(run, checkpoint, Path(tmp) / "run"))
            if original:
                model.load_adapter(str(checkpoint_adapter(run, checkpoint, Path(tmp) / ORIGINAL, original=True)),
                                   adapter_name=ORIGINAL)
    return model.eval(), tokenizer
