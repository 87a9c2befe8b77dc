"""`qloraga evaluate`: a run is scored on its base loaded exactly as the run loaded it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import torch
import yaml
from transformers import AutoTokenizer

from qloraga import QLoraGAConfig, export_adapter, load_model, loading
from qloraga.adapters import get_lora_model
from qloraga.cli.evaluate import main
from qloraga.config import DEMO_EVAL, DEMO_MODEL, RunConfig


def test_run_is_scored_on_the_base_as_the_run_loaded_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(model=str(DEMO_MODEL), eval_dataset=str(DEMO_EVAL), load_in_4bit=True, dtype="float32",
                    init="lora", seq_len=64, output_dir=str(run))
    cfg.lora_ga = QLoraGAConfig(r=2, lora_alpha=4, adapter_dtype="float32", progress=False)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    model = get_lora_model(load_model(str(DEMO_MODEL), load_in_4bit=True, dtype=torch.float32), cfg.lora_ga)
    export_adapter(model, run / "adapter", tokenizer=AutoTokenizer.from_pretrained(str(DEMO_MODEL)))
    loads = []
    real = loading.load_model

    def spy(name, *args, **kwargs):
        loads.append((name, kwargs))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", spy)
    assert main(["--run", str(run), "--eval-samples", "2"]) == 0
    assert loads == [(str(DEMO_MODEL), {"load_in_4bit": True, "dtype": torch.float32, "trust_remote_code": False,
                                         "quant_storage": None})]
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] > 0 and math.isfinite(result["eval_loss"])


def test_evaluate_does_not_import_the_training_recipe():
    code = "import sys, qloraga.cli.evaluate; sys.exit('qloraga.recipe' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
