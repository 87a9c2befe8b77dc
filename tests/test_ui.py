"""`qloraga ui` without a browser: every refusal of the security rules over real HTTP requests to the app, the
page's errors against the CLI's own, the launch file against the CLI's resolution, and run states read back
from folders (tests/test_ui_browser.py drives the page itself)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio")
from starlette.testclient import TestClient

from qloraga.cli.finetune import main as finetune_main
from qloraga.cli.finetune import resolve_settings
from qloraga.config import RunConfig
from qloraga.errors import ConfigError
from qloraga.ui import server
from qloraga.ui.form import FIELDS, field_of, get, resolve_form, to_config
from qloraga.ui.jobs import RunsFolder, read_progress
from qloraga.ui.page import captured, error_of

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ui") / "runs"


@pytest.fixture(scope="module")
def exposed(runs_root):
    """The app as `qloraga ui --host 0.0.0.0 --token ...` serves it, uploads limited to 16 KiB."""
    return server.app(runs_root, token=TOKEN, host="0.0.0.0", max_upload_mb=1 / 64)


def client(app, host: str = "testserver", **kw) -> TestClient:
    return TestClient(app, base_url=f"http://{host}", **kw)


# ---- Security: binding, token, Host, files, uploads ----

def test_binds_loopback_by_default_and_other_hosts_need_a_token():
    args = server.parser().parse_args([])
    assert args.host == "127.0.0.1"
    assert server.access_token("127.0.0.1", None) is None
    generated = server.access_token("0.0.0.0", None)
    assert generated and len(generated) >= 24 and generated != server.access_token("0.0.0.0", None)
    assert server.access_token("192.168.1.5", "mine") == "mine"
    assert server.access_token("::1", None) is None and server.access_token("localhost", None) is None


@pytest.mark.parametrize("path", ["/", "/config", "/gradio_api/info", "/gradio_api/upload", "/theme.css"])
def test_requests_without_the_token_are_refused(exposed, path):
    with client(exposed) as c:
        assert c.get(path).status_code == 401
        assert c.get(path, params={"token": "wrong"}).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get(path, cookies={server.COOKIE: "wrong"}).status_code == 401


def test_the_token_opens_the_page_and_is_kept_in_a_cookie(exposed):
    with client(exposed) as c:
        first = c.get("/", params={"token": TOKEN})
        assert first.status_code == 200 and "<html" in first.text.lower()
        assert c.cookies.get(server.COOKIE) == TOKEN
        assert "httponly" in first.headers["set-cookie"].lower()
        assert c.get("/config").status_code == 200  # the page's own requests carry the cookie
    with client(exposed) as c:
        assert c.get("/config", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_loopback_page_refuses_other_host_names(runs_root):
    app = server.app(runs_root, host="127.0.0.1")
    with client(app, "127.0.0.1:7860") as c:
        assert c.get("/").status_code == 200
    with client(app, "localhost:7860") as c:
        assert c.get("/config").status_code == 200
    with client(app, "attacker.example:7860") as c:  # a DNS-rebinding page's requests
        assert c.get("/").status_code == 403
        assert c.get("/config").status_code == 403


def test_no_file_outside_the_runs_folder_is_served(exposed, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    monkeypatch.chdir(tmp_path)  # a file in the working directory is not served either
    with client(exposed, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for path in (str(secret), "secret.txt", "/etc/passwd", "../secret.txt"):
            response = c.get(f"/gradio_api/file={path}")
            assert response.status_code in (403, 404), path
            assert "do not serve me" not in response.text and "root:" not in response.text


def test_uploads_are_size_limited_and_stored_inside_the_runs_folder(exposed, runs_root):
    with client(exposed, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        small = c.post("/gradio_api/upload", files={"files": ("data.jsonl", b'{"text": "hi"}\n')})
        assert small.status_code == 200, small.text
        stored = Path(small.json()[0]).resolve()
        assert stored.is_relative_to(runs_root.resolve()) and stored.read_bytes() == b'{"text": "hi"}\n'
        big = c.post("/gradio_api/upload", files={"files": ("big.jsonl", b"x" * (20 * 1024))})
        assert big.status_code == 413
    assert not list(runs_root.rglob("big.jsonl"))


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/b", "", ".", "..", ".ui", "x" * 101, "name with space"])
def test_run_names_stay_inside_the_runs_folder(runs_root, name):
    runs = RunsFolder(runs_root)
    with pytest.raises(ConfigError, match="--output-dir / output_dir"):
        runs.start(name, RunConfig())
    assert not (runs_root.parent / "outside").exists()


def test_a_symlink_out_of_the_runs_folder_is_refused(tmp_path):
    runs = RunsFolder(tmp_path / "runs")
    (tmp_path / "elsewhere").mkdir()
    (runs.root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside the runs folder"):
        runs.folder("link")


def remote_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config needs its own code; running that code writes `marker`."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qloraga_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (folder / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'qloraga_custom'\n")
    return folder


def test_remote_code_runs_only_when_ticked(tmp_path):
    marker = tmp_path / "remote-code-ran"
    model = remote_code_model(tmp_path / "custom", marker)
    runs = RunsFolder(tmp_path / "runs")
    cfg = form_config({}, model=str(model), trust=False)
    code, _, err = captured(lambda: runs.start("custom-run", cfg))
    assert code != 0 and "trust_remote_code" in error_of(err)
    assert field_of(error_of(err)) == "trust_remote_code"
    assert not marker.exists() and not (runs.root / "custom-run").exists()
    # Ticked, the same checks run the model's code.
    from qloraga.preflight import check_run

    captured(lambda: check_run(form_config({}, model=str(model), trust=True)))
    assert marker.exists()


# ---- Bad input: the CLI's error, at the field it names, nothing started ----

def form_config(changes: dict, model: str = "demo", dataset: str = "demo", trust: bool = False) -> RunConfig:
    cfg = resolve_form("demo", "demo", None)[0]
    values = {f.key: f.to_value(get(cfg.to_dict(), f.key)) for f in FIELDS}
    return to_config(model, dataset, cfg.preset, trust, {**values, **changes})


@pytest.mark.parametrize(("changes", "flags", "field"), [
    ({"lora_ga.r": 0}, ["--rank", "0"], "lora_ga.r"),
    ({"lr": "-1"}, ["--lr", "-1"], "lr"),
    ({"seq_len": 0}, ["--seq-len", "0"], "seq_len"),
    ({"max_steps": -1, "epochs": 0}, ["--max-steps", "-1", "--epochs", "0"], "max_steps"),
    ({"eval_split": 1.5}, ["--eval-split", "1.5"], "eval_split"),
    ({"lora_ga.quant_error": "activation", "lora_ga.estimator": "sketch"},
     ["--quant-error", "activation", "--estimator", "sketch"], "lora_ga.quant_error"),
])
def test_bad_settings_give_the_cli_error_at_their_field(tmp_path, capsys, changes, flags, field):
    runs = RunsFolder(tmp_path / "runs")
    code, _, err = captured(lambda: runs.start("bad", form_config(changes)))
    assert code == 2
    cli_code = finetune_main(["--4bit", "--dry-run", *flags])
    cli_error = error_of(capsys.readouterr().err)
    assert cli_code == 2 and error_of(err) == cli_error
    assert field_of(cli_error) == field
    assert list(runs.root.iterdir()) == []


def test_a_missing_dataset_gives_the_cli_error(tmp_path, capsys):
    runs = RunsFolder(tmp_path / "runs")
    missing = str(tmp_path / "nope.jsonl")
    code, _, err = captured(lambda: runs.start("bad", form_config({}, dataset=missing)))
    assert finetune_main(["--4bit", "--dry-run", "--dataset", missing]) == 2
    assert code == 2 and error_of(err) == error_of(capsys.readouterr().err)
    assert field_of(error_of(err)) == "dataset" and missing in error_of(err)
    assert not (runs.root / "bad").exists()


# ---- The run is the CLI's: its launch file resolves to the page's settings ----

@pytest.mark.parametrize("init", ["lora-ga", "lora-one", "lora"])
def test_launch_file_resolves_to_the_page_settings(tmp_path, init):
    runs = RunsFolder(tmp_path / "runs")
    cfg = form_config({"init": init, "max_steps": 7, "lr": "3e-4", "lora_ga.r": 4})
    launch = runs.write_launch("a-run", cfg)
    resolved = resolve_settings({"config": str(launch), "output_dir": str(runs.folder("a-run"))}).config
    assert resolved.to_dict() == {**cfg.to_dict(), "output_dir": str(runs.folder("a-run"))}
    assert resolved.lr == 3e-4 and resolved.max_steps == 7 and resolved.init == init
    command = runs.command("a-run")
    assert command[1:4] == ["-m", "qloraga", "finetune"] and runs.command("a-run", resume=True)[-1] == "--resume"


# ---- Runs found again from their folders ----

def test_states_read_back_from_folders(tmp_path):
    runs = RunsFolder(tmp_path / "runs")
    finished = runs.root / "done"
    finished.mkdir()
    (finished / "config.yaml").write_text(yaml.safe_dump(RunConfig().to_dict()))
    (finished / "results.json").write_text(json.dumps({"steps": 3, "before": {}, "after": {}}))
    partial = runs.root / "partial" / "checkpoints" / "checkpoint-5"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{}")
    (runs.root / "partial" / "config.yaml").write_text(yaml.safe_dump(RunConfig().to_dict()))
    # A run another server started and that still runs: its process is found by pid and command line.
    live = runs.folder("live")
    runs.meta("live").mkdir(parents=True)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(live)])
    try:
        (runs.meta("live") / "process.json").write_text(json.dumps(
            {"pid": process.pid, "command": [], "started": time.time()}))
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        deadline = time.time() + 10
        while str(live) not in cmdline.read_bytes().decode() and time.time() < deadline:  # exec under way
            time.sleep(0.05)
        fresh = RunsFolder(runs.root)  # a new server: nothing in memory
        assert {n: fresh.state(n).state for n in fresh.names()} == {
            "done": "finished", "partial": "incomplete", "live": "running"}
        assert fresh.state("partial").detail == "checkpoint 5" and fresh.state("partial").resumable
        process.kill()
        process.wait()
        assert fresh.state("live").state == "incomplete"
    finally:
        process.kill()


def test_progress_read_from_tqdm_output():
    """The bars as tqdm itself writes them to a file (the run's log is not a terminal)."""
    import io

    from tqdm import tqdm

    log = io.StringIO()
    with tqdm(desc="LoRA-GA gradient", unit="batch", total=16, file=log, mininterval=0) as bar:
        bar.set_postfix_str("chunk 1/2")
        bar.update(8)
    with tqdm(total=40, file=log, mininterval=0) as bar:  # the Trainer's bar carries no label
        bar.update(12)
        with tqdm(total=13, file=log, mininterval=0, leave=False) as evaluation:
            evaluation.update(13)
    progress = read_progress(log.getvalue(), max_steps=40)
    assert (progress.init.n, progress.init.total, progress.init.post) == (8, 16, "chunk 1/2")
    assert (progress.train.n, progress.train.total) == (12, 40)
    assert read_progress(log.getvalue()).train.total == 40  # by epochs: the longest bar
