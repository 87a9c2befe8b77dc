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

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = {  # script: the JSON files its --tiny run writes
    "init_memory.py": ["init_memory_tiny.json", "init_memory_curves_tiny.json"],
    "init_time.py": ["init_time_tiny.json"],
    "throughput.py": ["throughput_tiny.json"],
    "convergence.py": ["convergence_reverse_tiny.json"],
    "llama7b.py": ["llama7b_tiny.json"],
    "forward_ab.py": ["forward_ab_tiny.json"],
    "real_convergence.py": ["real_convergence_debian_tiny.json", "real_convergence_pydoc_tiny.json"],
    "long_horizon.py": ["long_horizon_debian_qlora-peft-b-0_tiny.json",
                        "long_horizon_debian_lora-one-qloraga_tiny.json", "long_horizon_debian_tiny.json"],
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
    for plot in ("convergence_tiny.png", "real_convergence_tiny.png", "long_horizon_debian_tiny.png"):
        assert (tmp_path / plot).exists(), plot
