"""qloraga's errors: one base that library users can catch, a class per kind of thing that went wrong.

Each is something a user can cause and fix, so its message names the input and the fix; the `qloraga` command
prints it as one line without a traceback (`QLORAGA_DEBUG=1` shows it) and exits with the class's code.
`ConfigError`, `DataError`, `ModelSourceError` and `GGUFExportError` are also `ValueError`s, as the errors they
replace were.
"""

from __future__ import annotations


class QLoraGAError(Exception):
    """Anything qloraga refuses or stops on for a reason the message gives."""

    exit_code = 2


class ConfigError(QLoraGAError, ValueError):
    """A setting the user can fix; the message names the setting (or file and line) and the fix."""


class DataError(QLoraGAError, ValueError):
    """A dataset that cannot be trained on as given: the message names the file, the record and the fix."""


class ModelSourceError(QLoraGAError, ValueError):
    """A model (folder, file, checkpoint, or model object passed in) that cannot be used as given: missing,
    damaged, unsafe, of an unsupported kind, or without the adapters asked for."""


class GGUFExportError(QLoraGAError, ValueError):
    """This model or tokenizer cannot be written as GGUF; the message says why and what is supported."""


class RunError(QLoraGAError):
    """A run folder that cannot be used as asked (no run to resume, one already there, no adapter yet)."""


class TrainingDiverged(QLoraGAError):
    """A loss, gradient or weight became NaN or inf; nothing bad was written."""


class InitOutOfMemory(QLoraGAError):
    """The initialisation's smallest unit of work does not fit the device's memory."""


class RunInterrupted(QLoraGAError):
    """The user stopped the run (Ctrl-C); a checkpoint was written and `--resume` continues it."""

    exit_code = 130
