"""Export: a portable PEFT adapter (`adapter.py`), a merged model (`merged.py`), GGUF files (`gguf.py`); the
folder both the adapter and the merged model are written through (`folder.py`)."""

from qloraga.export.adapter import export_adapter
from qloraga.export.merged import export_merged

__all__ = ["export_adapter", "export_merged"]
