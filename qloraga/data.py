"""Datasets read as records: a JSON/JSONL/CSV/Parquet file or a hub dataset (`read_records`), and the seeded
held-out split. The formats the records come in are `formats.py`'s; tokens, packing and batches `batches.py`'s."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any

from qloraga.errors import DataError


def is_local(source: str | os.PathLike) -> bool:
    """Whether `source` names a local data file (else a hub dataset NAME[:CONFIG])."""
    path = Path(source).expanduser()
    return path.suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"} or path.exists()


def read_records(source: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """Records from a JSON/JSONL/CSV/Parquet file, or split `split` of a hub dataset `NAME[:CONFIG]`."""
    path = Path(source).expanduser()
    if is_local(source):
        if not path.exists():
            raise DataError(f"Dataset file {str(source)!r} does not exist: give a JSON/JSONL/CSV/Parquet path "
                            "or a dataset name on the hub.")
        records = read_file(path)
    else:
        import datasets

        name, _, subset = str(source).partition(":")
        try:
            records = datasets.load_dataset(name, subset or None, split=split).to_list()
        except Exception as exc:  # datasets raises many types for a bad name, config or split, or no network
            raise DataError(f"Could not load split {split!r} of dataset {str(source)!r} from the hub ({exc}). "
                            "Check NAME[:CONFIG] and the split, or give a local JSON/JSONL/CSV/Parquet file.") from exc
    if not records:
        raise DataError(f"Dataset {str(source)!r} holds no records: it needs at least one example.")
    return records


def read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import datasets

        return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
    if suffix == ".csv":  # cells stay text: a completion " 3" must not become the number 3
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: a .json dataset must be a list of objects (or {{\"data\": [...]}}).")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}). Each line of a JSONL file "
                            "must be one JSON object.") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}.")
        records.append(record)
    return records


def split(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split; at least one record on each side when there are two or more."""
    if not 0 < fraction < 1:
        raise DataError(f"--eval-split must be between 0 and 1, got {fraction}.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(records) * fraction)), len(records) - 1) if len(records) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:n_eval]]
