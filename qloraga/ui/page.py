"""The page (Gradio Blocks): New run, Live run, Runs, Use it. Each handler calls the CLI's or the library's
own code: `resolve_settings` and `dry_run` for the form and its preview, `jobs.RunsFolder` to start, stop and
resume `qloraga finetune` processes, the run folder's files for every figure, `cli.chat.Chat` for the chat and
`qloraga export` for the exports."""

from __future__ import annotations

import contextlib
import io
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from qloraga.cli.dryrun import MARK
from qloraga.errors import QLoraGAError
from qloraga.presets import available_presets
from qloraga.ui.form import FIELDS, MAIN, field_of, get, resolve_form, to_config
from qloraga.ui.jobs import RunsFolder, loss_points

AUTO = "auto (detected)"
TRUST_WARNING = ("**trust_remote_code is on**: loading this model runs Python code from its repository with your "
                 "rights. Tick it only for a model whose code you trust.")
EMPTY_ANSWER = "(no text: the model ended its answer at once)"
MARK_SPLIT = f"[{MARK[0]}{MARK[1]}]"  # the dry run's marks around the trained span
CSS = ".field-error { border: 2px solid #d32f2f !important; border-radius: 6px; } #form-error { color: #b71c1c; }"


def component(f) -> gr.Component:
    common = {"label": f.label, "info": f.help or None, "elem_id": "field-" + f.key.replace(".", "-")}
    if f.kind == "checkbox":
        return gr.Checkbox(**common)
    if f.kind == "dropdown":
        return gr.Dropdown(list(f.choices), **common)
    if f.kind in ("int", "float"):
        return gr.Number(precision=0 if f.kind == "int" else None, **common)
    return gr.Textbox(**common)


def captured(job) -> tuple[int, str, str]:
    """Run `job` as the CLI runs a subcommand (its errors as one `error:` line, its exit code) and return
    (exit code, stdout, stderr)."""
    from qloraga.cli import run_command

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_command(job)
        except Exception as exc:  # where the CLI would print a traceback, the page still says what happened
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
    return code, out.getvalue(), err.getvalue()


def error_of(stderr: str) -> str:
    """The CLI's error message (from its last `error: ` line on, which may run over several lines)."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    return "\n".join(lines[starts[-1]:]).removeprefix("error: ") if starts else stderr.strip()


def examples_of(dry_run_text: str) -> tuple[str, list[list[tuple[str, str | None]]]]:
    """The dry run's text without its examples, and each example as (text, "trained" | None) segments: an
    example is the indented block under its `example N` line."""
    parts = re.split(r"^example \d+ \(the loss is taken on .*\):\n", dry_run_text, flags=re.M)
    rest, examples = [parts[0].rstrip()], []
    for body in parts[1:]:
        lines = body.split("\n")
        end = next((i for i, line in enumerate(lines) if line and not line.startswith("  ")), len(lines))
        text = "\n".join(line.removeprefix("  ") for line in lines[:end]).strip("\n")
        examples.append([(piece, "trained" if i % 2 else None)
                         for i, piece in enumerate(re.split(MARK_SPLIT, text)) if piece])
        rest.append("\n".join(lines[end:]).rstrip())
    return settings_last("\n".join(r for r in rest if r)), examples


def settings_last(text: str) -> str:
    """The dry run's text with its long resolved-configuration block moved to the end."""
    lines = text.split("\n")
    if "resolved configuration:" not in lines:
        return text
    start = lines.index("resolved configuration:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith("  ")), len(lines))
    return "\n".join(lines[:start] + lines[end:] + lines[start:end])


def runs_table(runs: RunsFolder) -> pd.DataFrame:
    rows = []
    for name in runs.names():
        state, results = runs.state(name), runs.results(name)
        before, after = results.get("before") or {}, results.get("after") or {}

        def pair(key: str, spec: str, b: dict = before, a: dict = after) -> str:
            return f"{b[key]:{spec}} → {a[key]:{spec}}" if b.get(key) is not None and a.get(key) is not None else ""
        rows.append({"run": name, "status": state.state + (f" ({state.detail})" if state.detail else ""),
                     "steps": results.get("steps", ""), "held-out loss": pair("eval_loss", ".4f"),
                     "exact match": pair("accuracy", ".1%"),
                     "seconds": f"{results['seconds']:.0f}" if "seconds" in results else ""})
    return pd.DataFrame(rows, columns=["run", "status", "steps", "held-out loss", "exact match", "seconds"])


def curves(runs: RunsFolder, names: list[str], by_run: bool) -> pd.DataFrame | None:
    """The loss points of runs `names` for a LinePlot; None when there are none (Gradio's plot, once given an
    empty frame, draws no line for the data that follows)."""
    rows = [{"step": step, "loss": loss, "series": f"{name} {series}" if by_run else series}
            for name in names for step, loss, series in loss_points(runs.metrics(name))]
    if not rows:
        return None
    # Typed: the plot reads a column of objects as categories, not as a number axis.
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


def terminal(log: str) -> str:
    """The log as a terminal shows it: each progress bar's last state, not every redraw; no blank runs."""
    log = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log)
    lines = [([seg for seg in line.split("\r") if seg.strip()] or [""])[-1].rstrip() for line in log.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


class QueueStream:
    """A text stream whose writes go to a queue: what `Chat.reply` prints arrives here token by token."""

    def __init__(self):
        self.queue: queue.Queue[str | None] = queue.Queue()

    def write(self, text: str) -> int:
        self.queue.put(text)
        return len(text)

    def flush(self) -> None:
        pass


class Models:
    """The run model the chat talks to: one at a time, loaded as `qloraga chat` loads it."""

    def __init__(self, runs: RunsFolder):
        self.runs, self.name, self.model, self.tokenizer = runs, None, None, None
        self.fmt, self.frame = "messages", None
        self.lock = threading.Lock()

    def get(self, name: str):
        """(model, tokenizer, the format its prompts are rendered in, the training prompts' frame) of run `name`."""
        from qloraga.runs import load_run_model, open_run

        if name != self.name:
            self.model = self.tokenizer = None
            run = open_run(self.runs.folder(name))
            self.model, self.tokenizer = load_run_model(run)
            self.fmt, self.frame, self.name = run.dataset_format(), run.prompt_frame(), name
        return self.model, self.tokenizer, self.fmt, self.frame


def frame_line(runs: RunsFolder, name: str | None, framed: bool) -> str:
    """The Use it tab's line on how a prompt is sent: inside the training prompts' frame, or as written."""
    from qloraga.runs import open_run

    try:
        frame = open_run(runs.folder(name)).prompt_frame() if name else None
    except (QLoraGAError, OSError):
        return ""
    if frame is None:
        return ""
    return (f"Prompts go inside the training prompts' frame: `{frame.describe()}`" if framed
            else f"Prompts go as written (the training prompts' frame, `{frame.describe()}`, is off)")


def chat_args(max_new_tokens: int, temperature: float):
    from qloraga.cli.chat import parser

    return parser().parse_args(["--run", "-", "--max-new-tokens", str(int(max_new_tokens)),
                                "--temperature", str(float(temperature))])


def plain_messages(history: list[dict]) -> list[dict[str, str]]:
    """Chatbot messages as the chat template takes them (Gradio may hold content as a list of parts)."""
    out = []
    for m in history or []:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": str(content)})
    return out


def build(runs: RunsFolder) -> gr.Blocks:
    """The page for the runs folder `runs`."""
    models = Models(runs)
    presets = [AUTO, *available_presets()]
    form_components: dict[str, gr.Component] = {}

    with gr.Blocks(title="qloraga", analytics_enabled=False) as page:
        gr.Markdown(f"# qloraga\nRuns folder: `{runs.root}`")
        with gr.Tabs(selected="new") as tabs:
            # ---- New run ----
            with gr.Tab("New run", id="new"):
                with gr.Row():
                    model = gr.Textbox("demo", label="Model", elem_id="model", scale=3,
                                       info="a model folder, a .gguf file, or a hub name (demo: the embedded model)")
                    preset = gr.Dropdown(presets, value=AUTO, label="Preset", elem_id="preset", scale=1)
                with gr.Row():
                    dataset = gr.Textbox("demo", label="Dataset", elem_id="dataset", scale=3,
                                         info="a JSON/JSONL/CSV/Parquet path, a hub NAME[:CONFIG], or an upload")
                    upload = gr.File(label="Upload a dataset", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                                     elem_id="upload", scale=1, height=120)
                with gr.Row():
                    name = gr.Textbox("", label="Run name", elem_id="run-name", scale=3,
                                      info=f"the run's folder inside {runs.root}")
                    trust = gr.Checkbox(False, label="--trust-remote-code / trust_remote_code",
                                        info="run the model repository's own code", elem_id="trust-remote-code")
                trust_warning = gr.Markdown(TRUST_WARNING, visible=False, elem_id="trust-warning")
                resolved = gr.Markdown(elem_id="resolved")
                with gr.Group(), gr.Row():
                    for f in FIELDS[:len(MAIN)]:
                        form_components[f.key] = component(f)
                with gr.Accordion("All settings", open=False, elem_id="all-settings"):
                    for start in range(len(MAIN), len(FIELDS), 4):
                        with gr.Row():
                            for f in FIELDS[start:start + 4]:
                                form_components[f.key] = component(f)
                form_error = gr.Markdown(elem_id="form-error")
                with gr.Row():
                    detect = gr.Button("Detect settings", elem_id="detect")
                    preview = gr.Button("Preview", elem_id="preview")
                    start_button = gr.Button("Start", variant="primary", elem_id="start")
                preview_text = gr.Textbox(label="Preview (qloraga finetune --dry-run)", lines=12,
                                          elem_id="preview-text", visible=False)
                with gr.Row():
                    example_views = [gr.HighlightedText(label=f"Example {i + 1} (trained span marked)",
                                                        color_map={"trained": "green"}, visible=False,
                                                        elem_id=f"example-{i + 1}", show_legend=True)
                                     for i in range(2)]

            # ---- Live run ----
            with gr.Tab("Live run", id="live"):
                with gr.Row():
                    live_run = gr.Dropdown([], label="Run", elem_id="live-run", scale=3)
                    stop_button = gr.Button("Stop (checkpoint, then exit)", elem_id="stop", scale=1)
                    resume_button = gr.Button("Resume", elem_id="resume", scale=1)
                live_status = gr.Markdown(elem_id="live-status")
                live_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss (metrics.jsonl)",
                                        elem_id="live-plot", height=300,  # both series from the first point on
                                        color_map={"training": "#4c78a8", "held-out": "#f58518"})
                live_log = gr.Textbox(label="Log", lines=14, max_lines=14, autoscroll=True, elem_id="live-log")
                timer = gr.Timer(1.0)

            # ---- Runs ----
            with gr.Tab("Runs", id="runs"):
                refresh = gr.Button("Refresh", elem_id="runs-refresh")
                table = gr.Dataframe(label="Runs", elem_id="runs-table", interactive=False, wrap=True)
                compare = gr.Dropdown([], multiselect=True, label="Loss curves of (pick one or two runs)",
                                      elem_id="compare")
                compare_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss", height=300,
                                           elem_id="compare-plot")

            # ---- Use it ----
            with gr.Tab("Use it", id="use"):
                use_run = gr.Dropdown([], label="Finished run", elem_id="use-run")
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", elem_id="prompt", scale=4)
                    max_tokens = gr.Number(64, precision=0, label="Max new tokens", elem_id="max-tokens", scale=1)
                    temperature = gr.Number(0.0, label="Temperature (0: greedy)", elem_id="temperature", scale=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=4)
                    in_frame = gr.Checkbox(True, label="Inside the training prompts' frame", elem_id="use-frame",
                                           info="untick: the message as written (chat and the Modelfile)", scale=2)
                frame_note = gr.Markdown(elem_id="chat-frame")
                with gr.Row():
                    tuned_chat = gr.Chatbot(label="Tuned (base + adapter)", elem_id="chat-tuned", height=260)
                    base_chat = gr.Chatbot(label="Base (the same 4-bit base, adapter off)", elem_id="chat-base",
                                           height=260)
                chat_error = gr.Markdown(elem_id="chat-error")
                with gr.Row():
                    export_format = gr.Radio(["gguf", "merged"], value="gguf", label="Export as",
                                             info="gguf: adapter.gguf, model-f16/q8_0.gguf, Modelfile (llama, "
                                                  "mistral, qwen2 families); merged: a bf16 transformers folder",
                                             elem_id="export-format")
                    export_button = gr.Button("Export", elem_id="export")
                export_log = gr.Textbox(label="Export progress", lines=5, elem_id="export-log")
                export_files = gr.Dataframe(label="Files written", elem_id="export-files", interactive=False)

        fields_in = [form_components[f.key] for f in FIELDS]
        top_in = [model, dataset, preset, trust]
        marked = [*fields_in, model, dataset, name, trust]
        marked_keys = [*(f.key for f in FIELDS), "model", "dataset", "name", "trust_remote_code"]

        helps = [f.help or None for f in FIELDS] + [model.info, dataset.info, name.info, trust.info]
        titles = [f.label for f in FIELDS] + ["Model", "Dataset", "Run name", "trust_remote_code"]

        def field_updates(error_key: str | None, message: str = "") -> list:
            """The error beside the field it names (in red), every other field as it was."""
            return [gr.update(elem_classes=["field-error"], info=f"⚠ {message}") if key == error_key
                    else gr.update(elem_classes=[], info=help_) for key, help_ in zip(marked_keys, helps, strict=True)]

        def show_error(message: str) -> tuple[str, list]:
            key = field_of(message)
            where = f" (at **{titles[marked_keys.index(key)]}**)" if key else ""
            return f"**Error**{where}: {message}", field_updates(key, message)

        def fill(model_v: str, dataset_v: str, preset_v: str):
            """Every field as `qloraga finetune` resolves this model, dataset and preset."""
            holder: dict[str, Any] = {}

            def job():
                holder["cfg"], holder["md"] = resolve_form(model_v, dataset_v, None if preset_v == AUTO else preset_v)
            code, _, err = captured(job)
            if code:
                text, frames = show_error(error_of(err))
                return [gr.skip()] * len(fields_in) + ["", text, gr.skip(), *frames]
            cfg = holder["cfg"]
            values = [f.to_value(get(cfg.to_dict(), f.key)) for f in FIELDS]
            return [*values, holder["md"], "", runs.new_name(cfg), *field_updates(None)]

        fill_out = [*fields_in, resolved, form_error, name, *marked]
        detect.click(fill, [model, dataset, preset], fill_out)
        for box in (model, dataset):
            box.submit(fill, [model, dataset, preset], fill_out)
        preset.change(fill, [model, dataset, preset], fill_out)
        page.load(fill, [model, dataset, preset], fill_out)
        trust.change(lambda on: gr.update(visible=bool(on)), trust, trust_warning)

        def uploaded(file: str | None):
            """Keep the upload (already size-limited by Gradio) in the runs folder and train on it."""
            if not file:
                return gr.skip()
            target = runs.uploads() / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(file).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            return str(target)
        upload.upload(uploaded, upload, dataset)

        def config_from(args: list) -> Any:
            values = dict(zip([f.key for f in FIELDS], args[:len(FIELDS)], strict=True))
            model_v, dataset_v, preset_v, trust_v = args[len(FIELDS):len(FIELDS) + 4]
            return to_config(model_v, dataset_v, None if preset_v == AUTO else preset_v, trust_v, values)

        def do_preview(*args):
            from qloraga.cli.dryrun import dry_run

            code, out, err = captured(lambda: dry_run(config_from(list(args))))
            hidden = [gr.update(visible=False)] * 2
            if code:
                text, frames = show_error(error_of(err))
                return [text, gr.update(visible=False), *hidden, *frames]
            text, examples = examples_of(out)
            views = [gr.update(value=examples[i], visible=True) if i < len(examples) else gr.update(visible=False)
                     for i in range(2)]
            return ["", gr.update(value=text, visible=True), *views, *field_updates(None)]
        preview.click(do_preview, [*fields_in, *top_in], [form_error, preview_text, *example_views, *marked])

        def do_start(*args):
            run_name = args[-1]
            code, _, err = captured(lambda: runs.start(run_name, config_from(list(args[:-1]))))
            if code:
                text, frames = show_error(error_of(err))
                return [text, gr.skip(), gr.skip(), *frames]
            return ["", gr.Tabs(selected="live"), gr.update(choices=runs.names(), value=run_name),
                    *field_updates(None)]
        start_button.click(do_start, [*fields_in, *top_in, name], [form_error, tabs, live_run, *marked])

        # ---- Live run: everything read back from the run's files every second ----
        def live(run_name: str | None, shown: str):
            """Status, plot, log and buttons of the run, from its files. `shown` says what the plot holds
            ("count|series", "" for nothing yet): a plot whose series change is cleared first, one tick
            before the new data (Gradio 6 draws no line for a series added to a drawn plot)."""
            if not run_name:
                return "No run yet: start one on the New run tab.", gr.skip(), "", shown, gr.skip(), gr.skip()
            state, progress = runs.state(run_name), runs.progress(run_name)
            lines = [f"**{run_name}**: {state.state}" + (f" ({state.detail})" if state.detail else "")]
            if progress.init:
                b = progress.init
                lines.append(f"Initialisation: {b.n}/{b.total} {b.label} batches" + (f", {b.post}" if b.post else ""))
            if progress.train:
                b = progress.train
                lines.append(f"Training: step {b.n}/{b.total}, elapsed {b.elapsed}, remaining {b.remaining}")
            points = curves(runs, [run_name], by_run=False)
            count = 0 if points is None else len(points)
            lines.append(f"{count} loss points")
            series = "" if points is None else ",".join(sorted(set(points["series"])))
            now = f"{count}|{series}"
            if now == shown:
                plot = gr.skip()
            elif shown and shown != "cleared" and shown.split("|")[1] != series:
                plot, now = None, "cleared"
            else:
                plot = points
            running = state.state == "running"
            return ("  \n".join(lines), plot, terminal(runs.log(run_name)), now,
                    gr.update(interactive=running), gr.update(interactive=state.resumable))
        shown_points = gr.State("")
        live_out = [live_status, live_plot, live_log, shown_points, stop_button, resume_button]
        timer.tick(live, [live_run, shown_points], live_out, show_progress="hidden")
        live_run.change(lambda n: live(n, "?|?"), live_run, live_out)

        def stop(run_name: str | None):
            if run_name:
                runs.stop(run_name)
        stop_button.click(stop, live_run, None)

        def resume(run_name: str | None):
            if not run_name:
                return ""
            code, _, err = captured(lambda: runs.resume(run_name))
            return f"**Error**: {error_of(err)}" if code else ""
        resume_button.click(resume, live_run, live_status)

        # ---- Runs ----
        def listing(selected: list[str] | None):
            names = runs.names()
            keep = [n for n in (selected or []) if n in names]
            finished = [n for n in names if runs.state(n).state == "finished"]
            return (runs_table(runs), gr.update(choices=names, value=keep),
                    gr.update(choices=finished, value=finished[0] if finished else None),
                    gr.update(choices=names, value=names[0] if names else None))
        listing_out = [table, compare, use_run, live_run]
        refresh.click(listing, compare, listing_out)
        page.load(listing, compare, listing_out)
        def compared(names: list[str] | None) -> Iterator:
            yield None  # cleared first: the runs picked bring new series (see `live`)
            yield curves(runs, names or [], by_run=True)
        compare.change(compared, compare, compare_plot)

        # ---- Use it: chat ----
        def chat(run_name: str | None, text: str, tuned: list, base: list, max_new: float,
                 temp: float, framed: bool) -> Iterator:
            if not run_name or not text.strip():
                yield tuned, base, "Pick a finished run and type a prompt."
                return
            from qloraga.cli.chat import Chat

            with models.lock:
                try:
                    model_, tokenizer, fmt, frame = models.get(runs.folder(run_name).name)
                except (QLoraGAError, OSError) as exc:
                    yield tuned, base, f"**Error**: {exc}"
                    return
                histories = [plain_messages(tuned), plain_messages(base)]
                shown = [list(tuned or []), list(base or [])]
                for side, adapter_on in ((0, True), (1, False)):
                    stream = QueueStream()
                    conversation = Chat(model_, tokenizer, chat_args(max_new, temp), stream=stream, fmt=fmt,
                                        frame=frame if framed else None)
                    conversation.messages = histories[side]

                    def answer(c=conversation, s=stream, on=adapter_on):
                        try:
                            if on:
                                c.reply(text)
                            else:
                                with model_.disable_adapter():
                                    c.reply(text)
                        finally:
                            s.queue.put(None)
                    thread = threading.Thread(target=answer, daemon=True)
                    thread.start()
                    shown[side] = [*shown[side], {"role": "user", "content": text},
                                   {"role": "assistant", "content": ""}]
                    reply = ""
                    while (chunk := stream.queue.get()) is not None:
                        reply += chunk
                        shown[side][-1] = {"role": "assistant", "content": reply.strip()}
                        yield shown[0], shown[1], ""
                    thread.join()
                    if not reply.strip():
                        shown[side][-1] = {"role": "assistant", "content": EMPTY_ANSWER}
            yield shown[0], shown[1], ""
        send.click(chat, [use_run, prompt, tuned_chat, base_chat, max_tokens, temperature, in_frame],
                   [tuned_chat, base_chat, chat_error])
        use_run.change(lambda _: ([], [], ""), use_run, [tuned_chat, base_chat, chat_error])
        use_run.change(lambda name, framed: frame_line(runs, name, framed), [use_run, in_frame], frame_note)
        in_frame.change(lambda name, framed: frame_line(runs, name, framed), [use_run, in_frame], frame_note)

        # ---- Use it: export ----
        def export(run_name: str | None, fmt: str, framed: bool) -> Iterator:
            if not run_name:
                yield "Pick a finished run.", None
                return
            folder = runs.folder(run_name)
            out = folder / fmt
            command = [sys.executable, "-m", "qloraga", "export", "--run", str(folder), "--format", fmt,
                       *([] if framed else ["--no-frame"])]
            started = time.time()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       stdin=subprocess.DEVNULL)
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
            reader.start()
            while process.poll() is None:
                yield (f"$ qloraga export --run {folder} --format {fmt}\n{time.time() - started:.0f} s: "
                       f"{'loading the run and writing' if lines == [] else lines[-1].strip()}", files(out))
                time.sleep(0.5)
            reader.join()
            status = "done" if process.returncode == 0 else f"failed (exit status {process.returncode})"
            yield (f"$ qloraga export --run {folder} --format {fmt}\n{''.join(lines).strip()}\n{status} in "
                   f"{time.time() - started:.0f} s", files(out))
        export_button.click(export, [use_run, export_format, in_frame], [export_log, export_files])

    return page


def files(folder: Path) -> pd.DataFrame:
    """The files under `folder` so far, with their paths and sizes."""
    rows = [{"path": str(p), "MiB": round(p.stat().st_size / 2**20, 2)}
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")] \
        if folder.exists() else []
    return pd.DataFrame(rows, columns=["path", "MiB"])
