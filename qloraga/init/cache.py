"""A safetensors cache of finished chunks' factors, so an interrupted initialisation resumes.

One file per finished chunk; each carries a fingerprint of everything the factors depend on (model,
targets, gradient batches, LoRA-GA settings). Files with another fingerprint are ignored.
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
                   "svd_niter", "estimator")


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
    def by_fingerprint(directory: str | Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Every readable cache file's factors under `directory`, grouped by fingerprint. A file that is not
        safetensors, or is damaged, is never unpickled: it is ignored with a warning that names it."""
        found: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for path in sorted(Path(directory).glob("chunk-*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    key = (f.metadata() or {}).get("fingerprint", "")
                    names = {k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
                    chunk = {n: (f.get_tensor(f"{n}.A0"), f.get_tensor(f"{n}.B0")) for n in names}
            except Exception as exc:  # safetensors raises its own error type for a damaged file
                warnings.warn(f"Ignoring cache file {path}: not a readable safetensors file ({exc}).", stacklevel=2)
                continue
            found.setdefault(key, {}).update(chunk)
        return found

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.by_fingerprint(self.directory).get(self.key, {})

    def save(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        tensors = {}
        for name, (a, b) in factors.items():
            tensors[f"{name}.A0"], tensors[f"{name}.B0"] = a, b
        self.directory.mkdir(parents=True, exist_ok=True)
        layers = hashlib.sha256("\n".join(sorted(factors)).encode()).hexdigest()[:12]
        path = self.directory / f"chunk-{self.key[:12]}-{layers}.safetensors"
        save_tensors(tensors, path, metadata={"fingerprint": self.key})
