"""The init's progress bar names the method that runs (a LoRA-One init once said "LoRA-GA gradient"), and the
web page's progress reader finds that bar in a run's log."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches

from qloraga import QLoraGAConfig, get_qloraga_model, load_model
from qloraga.ui.jobs import read_progress

pytestmark = pytest.mark.unit
NAMES = {"lora-ga": "LoRA-GA", "lora-one": "LoRA-One", "gora": "GoRA"}  # as the user reads the methods' names


@pytest.mark.parametrize("method", list(NAMES))
def test_the_init_bar_names_its_method_and_the_page_reads_it(tiny_model_dir, capfd, method):
    model = load_model(tiny_model_dir(), load_in_4bit=False, dtype=torch.float32)
    get_qloraga_model(model, QLoraGAConfig(method=method, r=2, progress=True), make_batches(n_batches=2))
    log = capfd.readouterr().err
    others = [name for m, name in NAMES.items() if m != method]
    assert f"{NAMES[method]} gradient:" in log and not any(f"{name} gradient" in log for name in others), log
    init = read_progress(log).init
    assert init is not None and (init.n, init.total, init.label) == (2, 2, f"{NAMES[method]} gradient")
