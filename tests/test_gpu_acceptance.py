"""bench/gpu_acceptance.py keeps every figure it made: a sub-check that fails (Liger's kernels, a plot without
matplotlib, a study worker past the deadline) is a goal row that says why, and each part's JSON is still
written with the rest of its figures. (tests/test_bench_smoke.py runs it whole, with everything installed.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_study
import real_convergence as rc

BENCH = Path(gpu_study.__file__).parent

# In a fresh interpreter: matplotlib and liger-kernel cannot be imported, and Liger is taken to be usable here
# (as on a GPU with liger-kernel installed), so every --liger check runs and fails. The study is its report on
# finished runs (the real study's workers take a minute on a CPU; test_bench_smoke runs them): what matters
# here is that its figures are saved before its plot is drawn.
RUNNER = """
import json, sys
bench, out, runs = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, bench)
for name in ("matplotlib", "liger_kernel", "liger_kernel.transformers"):
    sys.modules[name] = None
import gpu_acceptance, gpu_study
gpu_acceptance.liger_problem = lambda: None
results = json.loads(open(runs).read())
gpu_acceptance.RUNNERS["study"] = lambda ctx: gpu_study.report(results, gpu_study.plan(True), 2, True)
sys.argv = ["gpu_acceptance.py", "--tiny", "--out", out]
gpu_acceptance.main()
"""


def finished_runs() -> list[dict]:
    """What the tiny study's runs write: each method at each rate, seeds 0 and 1, held-out loss at steps 0 and 2."""
    settings = gpu_study.plan(True)
    return [{"task": "debian", "method": m, "lr": lr, "seed": seed, "val_loss": 6.0 - i * 0.1 - lr,
             "step": [0, 2], "test_loss": [6.3, 6.2 - i * 0.1 - seed * 0.01]}
            for i, m in enumerate(settings["methods"]) for lr in settings["grid"] for seed in range(2)]


@pytest.mark.slow  # the product's commands, llama.cpp and a child process: ~1 min
def test_every_part_writes_its_figures_without_matplotlib_or_liger(tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(finished_runs()))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(BENCH), str(tmp_path), str(runs)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "failed: " in proc.stderr, proc.stderr[-4000:]  # the failed checks, named
    parts = {p: json.loads((tmp_path / f"gpu_{p}_tiny.json").read_text())
             for p in ("product", "memory", "throughput", "study")}

    def failures(part: str) -> dict[str, str]:
        return {g["goal"]: g["value"] for g in parts[part]["goals"] if str(g["value"]).startswith("failed:")}

    product = parts["product"]
    assert [(s["step"], s["exit"]) for s in product["steps"]] == [("finetune", 0), ("chat", 0), ("export", 0),
                                                                  ("llama.cpp", 0)]
    assert "--liger: LoRA-GA's step 0 (a child process)" in failures("product")  # no CUDA in the child
    assert any(g["goal"] == "finetune --liger (10 steps) exits 0" and g["value"] == 2 and g["met"] is False
               for g in product["goals"])  # preflight refuses --liger without CUDA, after the unfused run

    memory = parts["memory"]
    assert {(r["config"], r["phase"]) for r in memory["rows"]} >= {
        ("(c) plain QLoRA step, checkpointing", "train"), ("(s) sketch estimator", "init"),
        ("(a) qloraga defaults: LoRA-One, auto budget, exact", "init"),
        ("(a) qloraga defaults: LoRA-One, auto budget, exact", "train")}
    assert {"(a) + --liger", "(c) + --liger"} <= set(failures("memory"))
    assert all("ModuleNotFoundError" in v or "ImportError" in v for v in failures("memory").values())

    throughput = parts["throughput"]
    assert {r["T"] for r in throughput["rows"]} == {8, 16}
    assert set(failures("throughput")) == {"qloraga, fp32 adapters + --liger"}

    study = parts["study"]
    assert len(study["runs"]) == len(finished_runs()) and study["tasks"]["debian"]["reach"]
    assert set(failures("study")) == {"gpu_study_tiny.png"}
    assert not (tmp_path / "gpu_study_tiny.png").exists()
    report = (tmp_path / "gpu_acceptance_tiny.md").read_text()
    assert "gpu_study_tiny.png | failed: " in report and "## study" in report


def test_study_past_its_deadline_reports_what_finished(tmp_path):
    """A worker that has said nothing by the deadline is stopped, and the study reports (here: no run finished)
    instead of raising and losing the part."""
    start = time.perf_counter()
    result = gpu_study.run(tmp_path, rc.tiny_base(), time.time() - 1, tiny=True)
    assert time.perf_counter() - start < 60  # the worker is not waited for
    values = {g["goal"]: g["value"] for g in result["goals"]}
    assert values["every run of the study finishes"].startswith("failed: TimeoutError: study worker 0 said nothing")
    assert values["debian: runs finished"] == 0 and result["runs"] == [] and result["plots"] == []


@pytest.mark.unit
@pytest.mark.parametrize("missing", ["QLoRA", "none"])
def test_study_report_on_part_of_the_runs(missing):
    """Without tuned QLoRA's runs (the reference) a task keeps its spread and grid; with none, a row says so."""
    runs = [r for r in finished_runs() if missing == "QLoRA" and r["method"] != rc.PLAIN]
    result = gpu_study.report(runs, gpu_study.plan(True), 2, True)
    if missing == "none":
        assert [g["goal"] for g in result["goals"]] == ["debian: runs finished"] and result["plots"] == []
    else:
        task = result["tasks"]["debian"]
        assert task["reach"] == [] and {r["method"] for r in task["spread"]} == {"LoRA-One (qloraga)",
                                                                                 gpu_study.FULL}
        assert len(task["grid"]) == 4 and len(result["plots"]) == 1
