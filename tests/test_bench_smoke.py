"""Smoke test: every bench script still runs end to end on a tiny shape (`--tiny`), writing its JSON.

The benchmarks themselves are not tests and stay out of CI's time; this only catches a script broken by a
library change. All scripts run in one fresh interpreter (one import of torch and friends, not five).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = {  # script: the JSON files its --tiny run writes
    "init_memory.py": ["init_memory_tiny.json", "init_memory_curves_tiny.json"],
    "init_time.py": ["init_time_tiny.json"],
    "throughput.py": ["throughput_tiny.json"],
    "convergence.py": ["convergence_reverse_tiny.json"],
    "llama7b.py": ["llama7b_tiny.json"],
    "forward_ab.py": ["forward_ab_tiny.json"],
    "merged_export.py": ["merged_export_tiny.json"],
    "real_convergence.py": ["real_convergence_debian_tiny.json", "real_convergence_pydoc_tiny.json"],
    "long_horizon.py": ["long_horizon_debian_qlora-peft-b-0_tiny.json",
                        "long_horizon_debian_lora-one-qloraga_tiny.json", "long_horizon_debian_tiny.json"],
    "quant_gap_step0.py": ["quant_gap_step0_tiny.json"],
    "quant_gap.py": ["quant_gap_debian_qlora-peft-b-0_tiny.json", "quant_gap_debian_loftq-peft-1-iteration_tiny.json",
                     "quant_gap_debian_quant-error-fit-alone-qloraga-b-0_tiny.json", "quant_gap_tiny.json"],
}
RUNNER = """
import runpy, sys
bench, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, bench)
for script in sys.argv[3:]:
    sys.argv = [f"{bench}/{script}", "--tiny", "--out", out]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_every_bench_script_runs_tiny(tmp_path):
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(BENCH), str(tmp_path), *SCRIPTS],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for script, files in SCRIPTS.items():
        for name in files:
            result = json.loads((tmp_path / name).read_text())
            assert result["machine"]["torch"], f"{script} wrote {name} without its header"
    for plot in ("convergence_tiny.png", "real_convergence_tiny.png", "long_horizon_debian_tiny.png",
                 "quant_gap_tiny.png"):
        assert (tmp_path / plot).exists(), plot


def test_gpu_acceptance_runs_tiny(tmp_path):
    """bench/gpu_acceptance.py --tiny on the CPU: every part, the product's commands exit 0 (llama.cpp loads the
    exported adapter), and what needs CUDA says it was skipped (its own process: it is the longest, ~1 min)."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(BENCH), str(tmp_path), "gpu_acceptance.py"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for part in ("product", "memory", "throughput", "study"):
        result = json.loads((tmp_path / f"gpu_{part}_tiny.json").read_text())
        assert result["machine"]["torch"] and result["goals"], part
    product = json.loads((tmp_path / "gpu_product_tiny.json").read_text())
    assert [(s["step"], s["exit"]) for s in product["steps"]] == [("finetune", 0), ("chat", 0), ("export", 0),
                                                                  ("llama.cpp", 0)]
    assert "adapter.gguf" in product["steps"][2]["figure"] and "with it" in product["steps"][3]["figure"]
    study = json.loads((tmp_path / "gpu_study_tiny.json").read_text())
    assert {r["method"] for r in study["runs"]} == {"QLoRA (PEFT, B=0)", "LoRA-One (qloraga)",
                                                    "full fine-tuning (bf16 base)"}
    assert all(r["step"] == [0, 2] for r in study["runs"])
    report = (tmp_path / "gpu_acceptance_tiny.md").read_text()
    if not torch.cuda.is_available():
        assert report.count("skipped: no CUDA") == 5, report
    assert (tmp_path / "gpu_study_tiny.png").exists()
