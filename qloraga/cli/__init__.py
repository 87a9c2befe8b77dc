"""The `qloraga` command: one entry point, a subcommand per job (`qloraga finetune --help`, ...).

Each subcommand is the `main(argv) -> int` of one module, imported only when it runs, so that
`qloraga --help` answers at once and a subcommand's heavy imports are paid only by that subcommand.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from collections.abc import Callable

# name -> (module whose main(argv) runs it, one line for the overview)
COMMANDS = {
    "finetune": ("qloraga.cli.finetune", "fine-tune a causal LM with gradient-aligned LoRA adapters (no argument: "
                 "the embedded demo)"),
    "evaluate": ("qloraga.cli.evaluate", "held-out loss and exact match of a base model or a base + adapter"),
    "export": ("qloraga.cli.export", "a run as a merged model, or GGUF files for llama.cpp / Ollama (--format gguf)"),
    "chat": ("qloraga.cli.chat", "talk to a finished run's model in the terminal"),
    "ui": ("qloraga.ui.server", "a local web page: new run with preview, live run, runs compared, chat, export"),
}


RESUME_HINT = "rerun the same command with --resume to continue from the last checkpoint"


def run_command(job: Callable[[], object], interrupted: str = RESUME_HINT) -> int:
    """Run one subcommand's work, as every `qloraga` subcommand does: a user's error (a `QLoraGAError`, a file
    the user named that cannot be read, a pickle refused) is one line on stderr and the error's exit code (2;
    130 for Ctrl-C, then `interrupted` says what to do), never a traceback from deep inside a library;
    `QLORAGA_DEBUG=1` shows the traceback. Any other exception is a bug and keeps its traceback."""
    from qloraga.errors import QLoraGAError, RunInterrupted

    try:
        job()
    except pickle.UnpicklingError as exc:
        if os.environ.get("QLORAGA_DEBUG"):
            raise
        print(f"error: refused to load a file that is not plain tensors ({exc}). qloraga only loads checkpoints "
              "with torch.load(weights_only=True); delete the suspicious file.", file=sys.stderr)
        return 2
    except (RunInterrupted, KeyboardInterrupt) as exc:
        print(f"\ninterrupted{f' ({exc})' if str(exc) else ''}: {interrupted}", file=sys.stderr)
        return RunInterrupted.exit_code
    except (QLoraGAError, OSError) as exc:  # OSError: a file the user named is missing or unreadable
        if os.environ.get("QLORAGA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return ("usage: qloraga {" + ",".join(COMMANDS) + "} [options]\n\n"
            "LoRA-GA fine-tuning of 4-bit (NF4) causal language models.\n\n" + "\n".join(lines)
            + "\n\n`qloraga COMMAND --help` lists a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from qloraga import __version__

        print(f"qloraga {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: choose one of {', '.join(COMMANDS)}.\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name == "finetune":
        return module.main(rest, prog="qloraga finetune")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
