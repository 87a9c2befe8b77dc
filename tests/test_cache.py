"""The factor cache: an interrupted initialisation resumes from its finished chunks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches

import qloraga.init.pipeline as initialization
from qloraga import QLoraGAConfig, load_model
from qloraga.init.pipeline import initial_factors
from qloraga.targets import find_target_layers


def run(path, cache_dir, batches):
    model = load_model(path)
    config = QLoraGAConfig(r=4, chunk_blocks=1, cache_dir=str(cache_dir), progress=False)
    return initial_factors(model, find_target_layers(model), batches, config)


def test_interrupted_initialisation_reuses_finished_chunks(tiny_model_dir, tmp_path, monkeypatch):
    path, batches = tiny_model_dir("llama"), make_batches()
    reference, _ = run(path, tmp_path / "clean", batches)

    real = initialization.accumulate_chunk
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C / SIGKILL during the second chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(initialization, "accumulate_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "cache", batches)
    monkeypatch.setattr(initialization, "accumulate_chunk", real)
    assert len(list((tmp_path / "cache").glob("chunk-*.safetensors"))) == 1

    factors, report = run(path, tmp_path / "cache", batches)
    assert report.cached_layers == 7 and report.chunks == 1
    for name, (a, b) in reference.items():
        torch.testing.assert_close(factors[name][0], a, rtol=0, atol=0)
        torch.testing.assert_close(factors[name][1], b, rtol=0, atol=0)


def test_cache_is_ignored_when_the_data_changes(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    run(path, tmp_path, make_batches(seed=0))
    _, report = run(path, tmp_path, make_batches(seed=1))
    assert report.cached_layers == 0
    _, report = run(path, tmp_path, make_batches(seed=0))
    assert report.cached_layers == 14


def test_out_of_memory_halves_the_chunk_and_retries(tiny_model_dir, monkeypatch, capsys):
    """An OOM on a chunk of two blocks is retried as two chunks of one block; the factors do not change."""
    path, batches = tiny_model_dir("llama"), make_batches()
    model = load_model(path)
    targets = find_target_layers(model)
    config = QLoraGAConfig(r=4, init_memory_gb=4.0, progress=False)  # both blocks in one chunk, until the OOM
    reference, _ = initial_factors(model, targets, batches, config)
    real = initialization.accumulate_chunk

    def oom_on_big_chunks(model, layers, *args, **kwargs):
        if len({n.split(".layers.")[1].split(".")[0] for n in layers}) > 1:
            raise torch.OutOfMemoryError("injected")
        return real(model, layers, *args, **kwargs)

    monkeypatch.setattr(initialization, "accumulate_chunk", oom_on_big_chunks)
    factors, report = initial_factors(model, targets, batches, config)
    assert report.chunks == 2
    assert "halving" in capsys.readouterr().err
    for name, (a, b) in reference.items():
        torch.testing.assert_close(factors[name][0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(factors[name][1], b, rtol=1e-5, atol=1e-6)
