"""`qloraga ui` as a person uses it: headless Chromium (Debian's, through Selenium and the system chromedriver;
nothing downloads a browser) against the embedded demo. Preview shows two examples; a bad rank is refused at
its field; Start runs `qloraga finetune`; the loss plot gains points; Stop writes a checkpoint; Resume
finishes; the chat answers from the tuned and the base model; the export writes its files; a second page
load finds the run again. QLORAGA_SCREENSHOTS=docs writes the README's screenshots (docs/ui-*.png)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from qloraga.ui.page import EMPTY_ANSWER  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
                allow_module_level=True)


@pytest.fixture
def server(tmp_path):
    """`qloraga ui` on a free port, as a user starts it; yields (url, runs folder)."""
    runs = tmp_path / "runs"
    # One thread per process: the server, the run and the browser share CI's two cores, and torch's threads
    # spinning against each other made the demo's steps 40x slower on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "qloraga", "ui", "--runs", str(runs), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                               env=env)
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline and "http://" not in line:
        line = process.stdout.readline()
        assert line or process.poll() is None, "qloraga ui exited before printing its URL"
    url = re.search(r"http://\S+", line).group(0)
    yield url, runs
    process.terminate()
    process.wait(30)
    for info in runs.glob(".ui/*/process.json"):  # a run the test left running
        pid = json.loads(info.read_text())["pid"]
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """Finds and works Gradio's widgets by the elem_ids the page gives them."""

    def __init__(self, driver, shots: Path | None, scratch: Path):
        self.d, self.shots, self.scratch = driver, shots, scratch

    def el(self, css: str):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        try:
            return self.el(f"#{elem_id}").text
        except WebDriverException:
            return ""

    def wait(self, what, timeout: float = 60, every: float = 0.5, message: str = ""):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = what()
            except WebDriverException:
                value = None
            if value:
                return value
            time.sleep(every)
        self.d.save_screenshot(str(self.scratch / "timeout.png"))
        raise AssertionError(f"timed out after {timeout:.0f} s: {message} (the page: {self.scratch}/timeout.png)")

    def value(self, elem_id: str) -> str:
        """A textbox's content (its text is in the value of its textarea, not in the page's text)."""
        try:
            return self.el(f"#{elem_id} input, #{elem_id} textarea").get_attribute("value") or ""
        except WebDriverException:
            return ""

    def type(self, elem_id: str, value: str) -> None:
        box = self.el(f"#{elem_id} input, #{elem_id} textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))
        box.send_keys(Keys.TAB)  # Gradio takes the value on change/blur

    def click(self, elem_id: str) -> None:
        self.el(f"#{elem_id}").click()

    def tab(self, label: str) -> None:
        self.wait(lambda: next((b for b in self.d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                               if b.text.strip() == label), None), message=f"tab {label}").click()

    def screenshot(self, name: str) -> None:
        """The whole page (the window grown to its height), for the README."""
        if self.shots is None:
            return
        self.d.execute_script("window.scrollTo(0, 0)")
        height = self.d.execute_script("return document.documentElement.scrollHeight")
        self.d.set_window_size(1400, min(height + 120, 2600))
        time.sleep(1)
        self.d.save_screenshot(str(self.shots / f"ui-{name}.png"))
        self.d.set_window_size(1400, 1100)


def line_pixels(png: bytes, hue: str = "any") -> int:
    """Pixels of the plot's coloured lines (axes, grid and labels are grey): "blue" (the training loss),
    "orange" (the held-out loss) or either."""
    import io

    from PIL import Image

    def coloured(r: int, g: int, b: int) -> bool:
        if max(r, g, b) - min(r, g, b) <= 80:
            return False
        return hue == "any" or (b > r if hue == "blue" else r > b)
    return sum(coloured(*p) for p in Image.open(io.BytesIO(png)).convert("RGB").getdata())


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("checkpoint-*"))


def test_page_end_to_end(server, browser, tmp_path):
    url, runs = server
    shots = Path(os.environ["QLORAGA_SCREENSHOTS"]).resolve() if os.environ.get("QLORAGA_SCREENSHOTS") else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    page = Page(browser, shots, tmp_path)
    browser.get(url)
    page.wait(lambda: "Preset demo" in page.text("resolved"), message="the resolved demo settings")

    # Bad input: the CLI's named error, at the field, and nothing started.
    page.type("field-lora_ga-r", "0")
    page.click("preview")
    page.wait(lambda: "--rank / lora_ga.r" in page.text("form-error"), message="the rank error")
    rank = page.el("#field-lora_ga-r")
    assert "field-error" in rank.get_attribute("class") and "positive integer" in rank.text
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]
    page.type("field-lora_ga-r", "8")

    # A short run: a loss point every 3 steps, checkpoints only when stopped, a small held-out set.
    eval_records = (Path(__file__).parents[1] / "qloraga/demo/data/eval.jsonl").read_text().splitlines()
    (tmp_path / "eval16.jsonl").write_text("\n".join(eval_records[:16]) + "\n")
    accordion = (By.XPATH, "//*[@id='all-settings']//*[normalize-space(text())='All settings']")
    browser.find_element(*accordion).click()
    for key, value in {"max_steps": 100, "logging_steps": 3, "eval_steps": 50, "save_steps": 1000,
                       "eval_samples": 4, "ga_batches": 2, "eval_dataset": tmp_path / "eval16.jsonl"}.items():
        page.type(f"field-{key}", value)
    page.type("run-name", "browser-demo")
    # The training data as an upload: stored inside the runs folder, and the dataset field names it.
    demo_data = Path(__file__).parents[1] / "qloraga/demo/data"
    shutil.copyfile(demo_data / "train.jsonl", tmp_path / "arith.jsonl")
    page.el("#upload input[type=file]").send_keys(str(tmp_path / "arith.jsonl"))
    uploaded = Path(page.wait(lambda: "arith.jsonl" in page.value("dataset") and page.value("dataset"),
                              message="the upload in the dataset field"))
    assert uploaded.parent == runs.resolve() / ".ui" / "uploads"
    assert uploaded.read_bytes() == (demo_data / "train.jsonl").read_bytes()

    # Preview: data statistics, memory per phase, two examples with the trained span marked.
    page.click("preview")
    page.wait(lambda: "memory estimate" in page.value("preview-text"), message="the dry run's text")
    assert "training records" in page.value("preview-text")
    for i in (1, 2):
        example = page.wait(lambda i=i: page.el(f"#example-{i}").text.strip(), message=f"example {i}")
        assert example
        trained = browser.find_elements(By.CSS_SELECTOR, f"#example-{i} .textspan.hl, #example-{i} [class*=hl]")
        assert trained, f"example {i} marks no trained span"
    assert page.text("form-error") == ""
    browser.find_element(*accordion).click()  # closed again for the screenshot
    page.screenshot("new-run")

    # Start: a `qloraga finetune` process of the page's settings; the live tab follows it.
    started = time.time()
    page.click("start")
    run = runs / "browser-demo"
    page.wait(lambda: "browser-demo" in page.text("live-status"), message="the live run's status")
    page.wait(lambda: (run / "config.yaml").exists(), 60, message="the run's config.yaml")
    assert json.loads((runs / ".ui/browser-demo/process.json").read_text())["command"][2:4] == ["qloraga",
                                                                                                 "finetune"]

    def points() -> int:
        match = re.search(r"(\d+) loss points", page.text("live-status"))
        return int(match.group(1)) if match else 0
    page.wait(lambda: points() >= 1, 240, message="the first loss point on the live plot")
    assert "Training: step" in page.text("live-status") and "Initialisation: 2/2" in page.text("live-status")

    # Stop = Ctrl-C: a checkpoint, then exit.
    assert not checkpoints(run)
    page.click("stop")
    page.wait(lambda: "stopped" in page.text("live-status"), 120, message="the run stopping")
    assert checkpoints(run), "Stop wrote no checkpoint"
    assert not (run / "results.json").exists()
    page.wait(lambda: line_pixels(page.el("#live-plot").screenshot_as_png, "blue"), 15,
              message="the training loss drawn")
    plot_stopped, count_stopped = page.el("#live-plot").screenshot_as_png, points()

    # Resume continues to the end; the plot gains the new points as they arrive.
    page.click("resume")
    page.wait(lambda: "running" in page.text("live-status"), 30, message="the run resuming")
    page.wait(lambda: "finished" in page.text("live-status"), 600, message="the resumed run finishing")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 100
    assert "resuming from" in (runs / ".ui/browser-demo/log.txt").read_text()
    page.wait(lambda: points() > count_stopped, 10, message="the plot gaining points")
    page.wait(lambda: line_pixels(page.el("#live-plot").screenshot_as_png, "orange"), 15,
              message="the held-out loss drawn beside the training loss")
    final = page.el("#live-plot").screenshot_as_png
    assert line_pixels(final, "blue") and final != plot_stopped
    training_seconds = time.time() - started
    page.screenshot("live-run")

    # Runs: the run, its figures, its curve.
    page.tab("Runs")
    page.click("runs-refresh")
    page.wait(lambda: "browser-demo" in page.text("runs-table") and "finished" in page.text("runs-table"),
              message="the run in the runs table")
    assert f"{results['after']['eval_loss']:.4f}" in page.text("runs-table")
    box = page.el("#compare input")
    box.click()
    box.send_keys("browser-demo")
    box.send_keys(Keys.ENTER)
    page.wait(lambda: line_pixels(page.el("#compare-plot").screenshot_as_png) > 0, message="the run's curve")
    page.screenshot("runs")

    # Use it: the tuned and the base model answer the same prompt; the GGUF export writes its files.
    page.tab("Use it")
    page.wait(lambda: "browser-demo" in page.el("#use-run input").get_attribute("value"), message="the run picked")
    question = json.loads((Path(__file__).parents[1] / "qloraga/demo/data/eval.jsonl").read_text().splitlines()[0])
    prompt = question.get("prompt") or question.get("instruction")
    page.type("prompt", prompt)
    page.click("send")

    def answers() -> list[str]:
        return [b.text.strip() for side in ("chat-tuned", "chat-base")
                for b in browser.find_elements(By.CSS_SELECTOR, f"#{side} [data-testid=bot]")]
    page.wait(lambda: len(answers()) == 2 and all(answers()), 120, message="answers from both models")
    # The same answers as `qloraga chat` gives in a terminal (greedy decoding).
    for shown, extra in zip(answers(), ([], ["--base-only"]), strict=True):
        terminal = subprocess.run([sys.executable, "-m", "qloraga", "chat", "--run", str(run), "--prompt", prompt,
                                   "--temperature", "0", "--max-new-tokens", "64", *extra], capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert terminal.returncode == 0, terminal.stderr
        assert shown.replace(EMPTY_ANSWER, "") == terminal.stdout.strip()
    assert answers()[0] != EMPTY_ANSWER, "the tuned model gave no text"
    # Export: the demo's word-level tokenizer has no GGUF form, so the page shows the CLI's refusal; the
    # merged model is written, and its files listed with their paths.
    page.click("export")
    page.wait(lambda: "failed" in page.value("export-log"), 180, message="the GGUF export's refusal")
    assert "error:" in page.value("export-log") and not (run / "gguf").exists()
    browser.find_element(By.XPATH, "//*[@id='export-format']//label[contains(., 'merged')]").click()
    page.click("export")
    page.wait(lambda: "done in" in page.value("export-log"), 180, message="the merged export")
    for name in ("config.json", "model.safetensors"):
        assert (run / "merged" / name).stat().st_size > 0
        assert str(run / "merged" / name) in page.text("export-files")
    page.screenshot("use-it")

    # A second page load finds the run again, from its folder.
    browser.refresh()
    page.tab("Runs")
    page.wait(lambda: "browser-demo" in page.text("runs-table") and "finished" in page.text("runs-table"),
              message="the run after a reload")
    print(f"\nbrowser test: training part {training_seconds:.0f} s")
