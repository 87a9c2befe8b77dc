"""The page's runs: each one a `qloraga finetune` process of its own, found again from its folder.

Nothing here trains. `start` writes the resolved settings to `RUNS/.ui/NAME/launch.yaml` and starts
`python -m qloraga finetune --config launch.yaml --output-dir RUNS/NAME` in a session of its own (closing the
page, or stopping the server with Ctrl-C, does not stop it); its output goes to `RUNS/.ui/NAME/log.txt`, its
pid and command to `process.json`. The run folder itself is the CLI's, untouched by the page. `stop` sends the
process SIGINT, which the run handles as Ctrl-C (a checkpoint, then exit); `resume` starts the same command
with `--resume`. Every state the page shows is read back from these files, so a reloaded page, or a new
server, finds running and finished runs again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from qloraga.config import METHODS, ConfigError, RunConfig, option
from qloraga.init.pipeline import init_bar
from qloraga.io import save_json, save_text
from qloraga.runs import last_checkpoint
from qloraga.training import read_metrics

UI_DIR = ".ui"  # inside the runs folder: launch files, logs, uploads
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
INTERRUPTED = 130  # `qloraga finetune`'s exit status after Ctrl-C
# A tqdm status line: "LoRA-One gradient:  50%|#####     | 8/16 [00:01<00:01, 5.2batch/s, chunk 1/2]".
BAR = re.compile(r"(?:(?P<desc>[^\r\n|]*?): *)?\d+%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) "
                 r"\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:?]+)(?:, *[^,\]]*)?(?:, *(?P<post>[^\]]*))?\]")
INIT_BARS = {init_bar(method) for method in METHODS}  # qloraga/init/pipeline.py's bar, one label per method


@dataclass
class Bar:
    """One progress bar as last printed."""

    n: int
    total: int
    elapsed: str
    remaining: str
    post: str = ""
    label: str = ""


@dataclass
class Progress:
    """Where a run is, from its log: the initialisation's bar and the Trainer's."""

    init: Bar | None = None
    train: Bar | None = None


def read_progress(log: str, max_steps: int = -1) -> Progress:
    """The last state of the init bar and of the training bar in `log`. The Trainer's bars carry no label;
    the training bar is the one of `max_steps` steps (or, when training runs by epochs, the longest, since
    an evaluation bar never covers more than a few hundred held-out examples in batches)."""
    bars = [Bar(int(m.group("n")), int(m.group("total")), m.group("elapsed"), m.group("remaining"),
                (m.group("post") or "").strip(), (m.group("desc") or "").strip()) for m in BAR.finditer(log)]
    init = [b for b in bars if b.label in INIT_BARS]
    plain = [b for b in bars if not b.label]
    total = max_steps if max_steps > 0 else max((b.total for b in plain), default=0)
    train = [b for b in plain if b.total == total]
    return Progress(init[-1] if init else None, train[-1] if train else None)


def loss_points(records: list[dict[str, Any]]) -> list[tuple[int, float, str]]:
    """(step, loss, series) for the training loss and the held-out loss."""
    return [(r["step"], r[key], label) for r in records
            for key, label in (("loss", "training"), ("eval_loss", "held-out")) if key in r]


@dataclass
class RunState:
    """What the page says of a run: running, finished, stopped (resumable), failed, or incomplete."""

    name: str
    state: str
    detail: str = ""

    @property
    def resumable(self) -> bool:
        return self.state in ("stopped", "failed", "incomplete")


def alive(pid: int, marker: str) -> bool:
    """Whether process `pid` runs and is the run's (its command line names the run folder): a pid reused by
    another program after a reboot is not taken for the run."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return marker in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class RunsFolder:
    """The runs folder the page works in: the only place it writes, and where it looks for runs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    # Paths: every name the page is given becomes a folder directly inside the runs folder, or an error.
    def folder(self, name: str) -> Path:
        """The folder of run `name`; a ConfigError for a name that is not one plain folder name here."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(f"{option('output_dir')}: {name!r} is not a run name: use letters, digits, '.', '_' "
                              f"and '-' (the run is written to {self.root}/NAME, nowhere else).")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise ConfigError(f"{option('output_dir')}: {name!r} leads outside the runs folder {self.root}.")
        return path

    def meta(self, name: str) -> Path:
        return self.root / UI_DIR / self.folder(name).name

    def uploads(self) -> Path:
        return self.root / UI_DIR / "uploads"

    def names(self) -> list[str]:
        """Every run here (a folder with config.yaml, or one the page started), newest first."""
        found = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and NAME.fullmatch(p.name) and (p / "config.yaml").exists()}
        ui = self.root / UI_DIR
        found |= {p.name for p in ui.iterdir() if (p / "process.json").exists()} if ui.exists() else set()

        def started(name: str) -> float:
            for p in (self.meta(name) / "process.json", self.root / name / "config.yaml"):
                if p.exists():
                    return p.stat().st_mtime if p.name == "config.yaml" else json.loads(p.read_text())["started"]
            return 0.0
        return sorted(found, key=started, reverse=True)

    def new_name(self, cfg: RunConfig) -> str:
        """`<model>-<time>`, as `qloraga finetune` names a run without --output-dir."""
        model = "demo" if cfg.model == "demo" else Path(cfg.model.rstrip("/")).name.removesuffix(".gguf")
        model = re.sub(r"[^A-Za-z0-9._-]", "-", model).lstrip(".-_") or "run"
        return f"{model}-{datetime.now():%Y%m%d-%H%M%S}"

    # Processes.
    def command(self, name: str, resume: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "qloraga", "finetune", "--config", str(self.meta(name) / "launch.yaml"),
               "--output-dir", str(self.folder(name))]
        return [*cmd, "--resume"] if resume else cmd

    def start(self, name: str, cfg: RunConfig) -> Path:
        """Start a new run `name` of `cfg` after the checks `qloraga finetune` makes before loading anything
        (a ConfigError or DataError, and nothing started, when one fails)."""
        from qloraga.preflight import check_run
        from qloraga.recipe import resolve_demo

        out = self.folder(name)
        if out.exists() or self.meta(name).exists():
            raise ConfigError(f"{option('output_dir')}: a run named {name!r} already exists in {self.root}: "
                              "choose another name, or resume it from the Live run tab.")
        check_run(resolve_demo(cfg))
        self.write_launch(name, cfg)
        self.launch(name, self.command(name))
        return out

    def write_launch(self, name: str, cfg: RunConfig) -> Path:
        """The run's settings as the `--config` file its process reads. `lora_ga.method` is left out: the
        CLI sets it from `init` and refuses a file where the two disagree (as they do for plain LoRA)."""
        settings = {**cfg.to_dict(), "output_dir": str(self.folder(name)), "resume": False, "overwrite": False}
        settings["lora_ga"] = {k: v for k, v in settings["lora_ga"].items() if k != "method"}
        self.meta(name).mkdir(parents=True, exist_ok=True)
        path = self.meta(name) / "launch.yaml"
        save_text(yaml.safe_dump(settings, sort_keys=False), path)
        return path

    def resume(self, name: str) -> None:
        state = self.state(name)
        if state.state == "running":
            raise ConfigError(f"{name} is still running.")
        if not (self.meta(name) / "launch.yaml").exists():
            raise ConfigError(f"{name} was not started from this page: resume it with `qloraga finetune --config "
                              f"{self.folder(name)}/config.yaml --output-dir {self.folder(name)} --resume`.")
        if last_checkpoint(self.folder(name)) is None and not (self.folder(name) / "config.yaml").exists():
            raise ConfigError(f"{name} stopped before it wrote anything to resume from: start a new run.")
        self.launch(name, self.command(name, resume=True))

    def launch(self, name: str, command: list[str]) -> None:
        meta = self.meta(name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("QLORAGA_DEBUG", None)  # the log shows the CLI's one-paragraph errors
        with (meta / "log.txt").open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True)
        self.processes[name] = process
        save_json({"pid": process.pid, "command": command, "started": time.time()}, meta / "process.json")

    def stop(self, name: str) -> bool:
        """Ctrl-C for the run: it finishes its step, writes a checkpoint and exits. False if it was not running."""
        info = self.process_info(name)
        if not info or self.returncode(name, info) is not None:
            return False
        os.kill(info["pid"], signal.SIGINT)
        return True

    def process_info(self, name: str) -> dict[str, Any] | None:
        path = self.meta(name) / "process.json"
        return json.loads(path.read_text()) if path.exists() else None

    def returncode(self, name: str, info: dict[str, Any]) -> int | str | None:
        """None while the process runs; its exit status once it ended ("unknown" when another server
        started it and it is gone)."""
        if "returncode" in info:
            return info["returncode"]
        process = self.processes.get(name)
        if process is not None and process.pid == info["pid"]:
            code = process.poll()
            if code is not None:
                save_json({**info, "returncode": code}, self.meta(name) / "process.json")
            return code
        return None if alive(info["pid"], str(self.folder(name))) else "unknown"

    # What the files say.
    def log(self, name: str, tail: int = 20000) -> str:
        path = self.meta(name) / "log.txt"
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - tail))
            return f.read().decode(errors="replace")

    def state(self, name: str) -> RunState:
        out, info = self.folder(name), self.process_info(name)
        code = self.returncode(name, info) if info else "unknown"
        checkpoint = last_checkpoint(out)
        saved = f"checkpoint {Path(checkpoint).name.split('-')[-1]}" if checkpoint else "no checkpoint"
        if code is None:
            return RunState(name, "running")
        if (out / "results.json").exists():
            return RunState(name, "finished")
        if code == INTERRUPTED:
            return RunState(name, "stopped", saved)
        if code == "unknown":
            return RunState(name, "incomplete", saved)
        errors = [line for line in self.log(name).splitlines() if line.startswith("error:")]
        return RunState(name, "failed", errors[-1] if errors else f"exit status {code}; see the log")

    def results(self, name: str) -> dict[str, Any]:
        path = self.folder(name) / "results.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def metrics(self, name: str) -> list[dict[str, Any]]:
        return read_metrics(self.folder(name) / "metrics.jsonl")

    def settings(self, name: str) -> dict[str, Any]:
        """The run's settings: its config.yaml (the CLI's), or the launch file before the run wrote one."""
        for path in (self.folder(name) / "config.yaml", self.meta(name) / "launch.yaml"):
            if path.exists():
                return yaml.safe_load(path.read_text()) or {}
        return {}

    def progress(self, name: str) -> Progress:
        return read_progress(self.log(name, tail=200_000), int(self.settings(name).get("max_steps") or -1))
