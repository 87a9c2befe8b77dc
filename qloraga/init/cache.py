"""A safetensors cache of finished chunks' factors, so an interrupted initialisation resumes.

One file per finished chunk; each carries a fingerprint of everything the factors depend on (model,
targets, gradient batches, LoRA-GA settings). Files with another fingerprint are ignored. Under the gradient
rank allocation a finished chunk's layers are not factorised yet (their ranks wait for every chunk's
importance): their summaries (`summary-*` files: importance and top singular triplets or `G A^T`) are kept.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qloraga.config import QLoraGAConfig
from qloraga.io import save_tensors

# Settings that change the factors; chunking, caching and progress bars do not.
FACTOR_SETTINGS = ("r", "lora_alpha", "method", "direction", "scale", "stable_gamma", "lora_one_gamma", "seed",
                   "svd_niter", "estimator", "rank_allocation", "rank_importance", "rank_min", "rank_max",
                   "gora_gamma")


def fingerprint(model: nn.Module, targets: dict[str, nn.Linear], batches: Iterable[dict],
                config: QLoraGAConfig) -> str:
    h = hashlib.sha256()
    model_config = getattr(model, "config", None)
    h.update(str(getattr(model, "name_or_path", "")).encode())
    h.update(model_config.to_json_string().encode() if model_config is not None else b"")
    h.update(json.dumps({k: getattr(config, k) for k in FACTOR_SETTINGS}, sort_keys=True).encode())
    h.update(json.dumps([(n, m.out_features, m.in_features) for n, m in targets.items()]).encode())
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FactorCache:
    """Factors `{layer: (A0, B0)}` of finished chunks, kept under `directory`."""

    def __init__(self, directory: str | Path, key: str):
        self.directory = Path(directory)
        self.key = key

    @staticmethod
    def records_by_fingerprint(directory: str | Path, kind: str = "chunk"
                               ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """Every readable `kind-*` file's tensors under `directory` as `{fingerprint: {layer: {field: tensor}}}`.
        A file that is not safetensors, or is damaged, is never unpickled: it is ignored with a warning."""
        found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for path in sorted(Path(directory).glob(f"{kind}-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    key = (f.metadata() or {}).get("fingerprint", "")
                    chunk: dict[str, dict[str, torch.Tensor]] = {}
                    for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        name, field = k.rsplit(".", 1)
                        chunk.setdefault(name, {})[field] = f.get_tensor(k)
            except Exception as exc:  # safetensors raises its own error type for a damaged file
                warnings.warn(f"Ignoring cache file {path}: not a readable safetensors file ({exc}).", stacklevel=2)
                continue
            found.setdefault(key, {}).update(chunk)
        return found

    @staticmethod
    def by_fingerprint(directory: str | Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Every readable chunk file's factors `{fingerprint: {layer: (A0, B0)}}` under `directory`."""
        found = {}
        for key, chunk in FactorCache.records_by_fingerprint(directory).items():
            try:
                found[key] = {n: (f["A0"], f["B0"]) for n, f in chunk.items()}
            except KeyError as exc:
                warnings.warn(f"Ignoring cache files of {key[:12]} under {directory}: no {exc} tensor.", stacklevel=2)
        return found

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.by_fingerprint(self.directory).get(self.key, {})

    def record_index(self, kind: str) -> dict[str, Path]:
        """`{layer: file}` of this fingerprint's `kind-*` files, from their headers only (no tensor is read)."""
        index: dict[str, Path] = {}
        for path in sorted(self.directory.glob(f"{kind}-{self.key[:12]}-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    if (f.metadata() or {}).get("fingerprint") != self.key:
                        continue
                    index.update({k.rsplit(".", 1)[0]: path for k in f.keys()})  # noqa: SIM118
            except Exception as exc:  # safetensors raises its own error type for a damaged file
                warnings.warn(f"Ignoring cache file {path}: not a readable safetensors file ({exc}).", stacklevel=2)
        return index

    @staticmethod
    def load_record(path: Path, name: str) -> dict[str, torch.Tensor]:
        """One layer's tensors `{field: tensor}` from one cache file, the file's other layers left on disk."""
        with safe_open(str(path), framework="pt") as f:
            return {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == name}  # noqa: SIM118

    def save(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.save_records({name: {"A0": a, "B0": b} for name, (a, b) in factors.items()})

    def save_records(self, records: dict[str, dict[str, torch.Tensor]], kind: str = "chunk") -> Path:
        """One finished chunk's tensors (`{layer: {field: tensor}}`) in one `kind-*` file; returns its path."""
        tensors = {f"{name}.{field}": t for name, fields in records.items() for field, t in fields.items()}
        self.directory.mkdir(parents=True, exist_ok=True)
        layers = hashlib.sha256("\n".join(sorted(records)).encode()).hexdigest()[:12]
        path = self.directory / f"{kind}-{self.key[:12]}-{layers}.safetensors"
        save_tensors(tensors, path, metadata={"fingerprint": self.key})
        return path
