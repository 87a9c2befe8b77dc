"""`--dry-run` prints the configuration, the data as trained and a memory estimate, and loads no weight."""

from __future__ import annotations

import pytest
import torch
from conftest import write_dataset

import qloraga.loading
import qloraga.recipe
from qloraga import load_model
from qloraga.cli.dryrun import marked, weight_bytes
from qloraga.cli.finetune import main
from qloraga.config import RunConfig
from qloraga.model_source import causal_lm_config, model_skeleton


def test_dry_run_loads_nothing_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("--dry-run loaded weights")

    monkeypatch.setattr(qloraga.recipe, "load_base", forbidden)
    monkeypatch.setattr(qloraga.loading, "load_model", forbidden)
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    out = tmp_path / "out"
    assert main(["--model", tiny_model_dir("llama"), "--dataset", data, "--output-dir", str(out), "--4bit",
                 "--rank", "4", "--seq-len", "64", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "resolved configuration:" in text and "  seq_len: 64" in text and "    r: 4" in text
    assert "data (prompt-completion): 23 training records" in text and "1 held out" in text
    assert "0 plus 0 is⟦ 0</s>⟧" in text  # the first record, its trained span (with the closing EOS) marked
    assert "weights (4-bit NF4 + bfloat16 rest)" in text and "training step" in text
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_weight_estimate_matches_the_loaded_4bit_model(tiny_model_dir, family, dtype):
    path = tiny_model_dir(family)
    model = load_model(path, load_in_4bit=True, dtype=getattr(torch, dtype))
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():  # the absmax of each 4-bit weight (and of its absmax, double quantization)
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            actual += state.absmax.numel() * state.absmax.element_size()
            state = state.state2
    estimate = weight_bytes(model_skeleton(causal_lm_config(path)), RunConfig(load_in_4bit=True, dtype=dtype))
    assert abs(estimate - actual) / actual < 0.01


def test_marked_spans():
    assert marked([("Q: 1+1?", False), (" 2", True), ("</s>", True)]) == "Q: 1+1?⟦ 2</s>⟧"
    assert marked([("a", True), ("b", False), ("c", True)]) == "⟦a⟧b⟦c⟧"
