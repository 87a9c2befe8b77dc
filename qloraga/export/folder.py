"""The one way an export folder is written (`write_folder`): complete or not at all, the tokenizer beside it.
Both the adapter (`adapter.py`) and the merged model (`merged.py`) go through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from peft import PeftModel

from qloraga.errors import ModelSourceError
from qloraga.io import atomic_dir
from qloraga.loading import disable_cpu_repacking


def write_folder(model: PeftModel, out_dir: str | os.PathLike, write: Callable[[Path], None],
                 tokenizer=None) -> Path:
    """`write(tmp)` into a temporary folder (and the tokenizer, if any), renamed to `out_dir` when complete."""
    if not isinstance(model, PeftModel):  # a plain model would be written whole, as if it were the adapter
        raise ModelSourceError(f"This {type(model).__name__} has no adapters to export: build it with "
                               "qloraga.get_qloraga_model (or load a run with qloraga.runs.load_run_model).")
    out_dir = Path(out_dir)
    disable_cpu_repacking(model)
    with atomic_dir(out_dir) as tmp:
        write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
