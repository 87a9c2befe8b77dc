"""A GGUF file as a transformers model folder: converted once (dequantized, bf16) by transformers' GGUF reader,
then cached under `$QLORAGA_CACHE/gguf`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qloraga.errors import ModelSourceError
from qloraga.io import atomic_dir


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only `.gguf` of a folder that has no config.json."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise ModelSourceError(f"{str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
                               "give the path of the one to load, e.g. --model " + str(found[0]))
    return found[0] if found else None


def gguf_cache_dir() -> Path:
    """Where converted GGUF files live: `$QLORAGA_CACHE/gguf`, by default `~/.cache/qloraga/gguf`."""
    return Path(os.environ.get("QLORAGA_CACHE") or "~/.cache/qloraga").expanduser() / "gguf"


def gguf_model_folder(file: str | os.PathLike) -> Path:
    """The model folder a GGUF file converts to, converting it the first time.

    The folder is named after the file's stem and a hash of its absolute path, size and mtime, so an
    edited or replaced file converts again. It is written to a temporary folder and renamed, under a
    lock, so an interrupted conversion leaves nothing and concurrent processes convert once.
    """
    file = Path(file).expanduser().resolve()
    stat = file.stat()
    key = hashlib.sha256(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = gguf_cache_dir() / f"{file.stem}-{key}"
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"Loading {str(file)!r} needs the gguf package for transformers' GGUF reader: "
                               "pip install 'gguf>=0.10,<1' (or pip install 'qloraga[real]').")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not (target / "config.json").exists():  # another process may have converted it meanwhile
            print(f"[qloraga] converting {file} to a transformers model folder (dequantized, bf16), once; "
                  f"cached in {target} (set QLORAGA_CACHE to move the cache)", file=sys.stderr)
            with atomic_dir(target) as tmp:
                convert_gguf(file, tmp)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, a concurrent conversion just does the work twice
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(file: Path, out: str | os.PathLike) -> None:
    """Dequantize a GGUF checkpoint with transformers' loader; save model and tokenizer to `out` (bf16)."""
    import transformers
    from transformers import AutoTokenizer, GgufConfig

    folder, name = str(file.parent), file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise ModelSourceError(f"transformers {transformers.__version__} cannot load the GGUF file {str(file)!r} "
                               f"({type(exc).__name__}: {exc}). Give the model's original transformers folder or "
                               "hub name instead (GGUF support depends on the architecture and the transformers "
                               "version).") from exc
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
