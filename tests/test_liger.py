"""`--liger`: refused before any weight is loaded where Liger's kernels cannot run (no CUDA, liger-kernel missing,
a family it does not patch); where they can, the Trainer is asked for them (`use_liger_kernel`). Whether the
fused run trains as the unfused one does is checked on a GPU by bench/gpu_acceptance.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import run_cli, write_dataset

import qloraga.preflight as preflight
import qloraga.recipe as recipe
from qloraga.config import ConfigError, RunConfig
from qloraga.model_source import causal_lm_config
from qloraga.training import liger_installed, training_arguments


@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before --liger was checked")

    monkeypatch.setattr(recipe, "load_base", forbidden)


def refused(capsys, out, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in ("--liger / liger", *needles):
        assert needle in err, err
    assert not out.exists()


def test_liger_is_refused_without_cuda(tiny_model_dir, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--liger")
    refused(capsys, tmp_path / "out", code, "CUDA", "Drop --liger")


def test_liger_is_refused_when_the_package_is_missing(tiny_model_dir, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight, "liger_installed", lambda: False)
    data = write_dataset(tmp_path / "d.jsonl", "prompt-completion")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--liger")
    refused(capsys, tmp_path / "out", code, "pip install liger-kernel")


def test_liger_installed_reads_the_environment():
    assert liger_installed() == (importlib.util.find_spec("liger_kernel") is not None)


def test_liger_is_refused_for_a_family_it_does_not_patch(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight, "liger_installed", lambda: True)
    monkeypatch.setattr(preflight, "liger_model_types", lambda: {"mistral", "qwen2"})
    model = tiny_model_dir("llama")
    with pytest.raises(ConfigError, match=r"--liger / liger: Liger has no kernels for model_type 'llama' "
                                          r"\(it patches mistral, qwen2\)"):
        preflight.check_liger(RunConfig(model=model, liger=True), causal_lm_config(model))


@pytest.mark.parametrize("liger", [True, False])
def test_the_trainer_gets_use_liger_kernel_where_it_can_run(tiny_model_dir, tmp_path, monkeypatch, liger):
    model = tiny_model_dir("llama")
    cfg = RunConfig(model=model, liger=liger, report_to="none")
    with monkeypatch.context() as m:  # a CUDA machine with liger-kernel, which patches llama
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(preflight, "liger_installed", lambda: True)
        m.setattr(preflight, "liger_model_types", lambda: {"llama"})
        preflight.check_liger(cfg, causal_lm_config(model))
    assert training_arguments(cfg, tmp_path / "checkpoints").use_liger_kernel is liger
