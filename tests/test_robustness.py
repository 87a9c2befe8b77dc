"""Bad input, numerical faults, interruption and unsafe files: a clear error or a clean recovery, never a
traceback and never lost work. Each case runs the real command line (in-process or as a subprocess)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import fails_with, run_cli, save_tiny, write_dataset
from safetensors.torch import load_file
from transformers import AutoModel, DistilBertConfig, TrainerCallback

import qloraga.init.pipeline as initialization
import qloraga.training as training
from qloraga.runs import last_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "train.jsonl", "prompt-completion")


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_model(tmp_path, data, capsys):
    fails_with(capsys, run_cli(str(tmp_path / "nope"), data, tmp_path / "out"), "does not exist")


def test_not_a_causal_lm(tmp_path, data, capsys):
    AutoModel.from_config(DistilBertConfig(dim=64, n_layers=1, n_heads=2, hidden_dim=64,
                                           vocab_size=64)).save_pretrained(tmp_path / "encoder")
    fails_with(capsys, run_cli(str(tmp_path / "encoder"), data, tmp_path / "out"), "not a causal language model")


def test_no_target_layers(tiny_model_dir, tmp_path, data, capsys):
    (tmp_path / "c.yaml").write_text("lora_ga:\n  target_modules: [attention_of_doom]\n")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--config", str(tmp_path / "c.yaml"))
    fails_with(capsys, code, "No linear layer matches", "q_proj")


def test_unknown_preset(tiny_model_dir, tmp_path, data, capsys):
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--preset", "llama9")
    fails_with(capsys, code, "Unknown preset 'llama9'", "phi3")


def test_malformed_yaml_names_file_and_line(tiny_model_dir, tmp_path, data, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nlora_ga: [r: 4\n")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--config", str(bad))
    fails_with(capsys, code, str(bad), "line 3")


def test_wrong_type_in_config(tiny_model_dir, tmp_path, data, capsys):
    (tmp_path / "c.yaml").write_text("warmup_ratio: lots\n")
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--config", str(tmp_path / "c.yaml"))
    fails_with(capsys, code, "warmup_ratio must be float")


@pytest.mark.parametrize(("content", "needle", "extra"), [
    (None, "does not exist", ()),
    ("", "holds no records", ()),
    ('{"prompt": "1", "completion": " 2"}\n{"prompt": "3", "completion": " 4"}\n{"prompt": oops}\n', "line 3", ()),
    ('{"prompt": "1", "completion": " 2"}\n{"prompt": "1 plus 1"}\n', "Record 2 lacks ['completion']", ()),
    ('{"prompt": "1 plus 1 is 2 and 2 plus 2 is", "completion": " 4"}\n', "all its labels masked",
     ("--seq-len", "8")),
])
def test_bad_dataset(tiny_model_dir, tmp_path, capsys, content, needle, extra):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    code = run_cli(tiny_model_dir("llama"), str(path), tmp_path / "out", "--eval-dataset", str(path), *extra)
    fails_with(capsys, code, needle)


def test_unknown_dataset_format(tiny_model_dir, tmp_path, data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--dataset-format", "yaml-soup")
    assert exit_info.value.code == 2
    assert "invalid choice: 'yaml-soup'" in capsys.readouterr().err


@pytest.mark.parametrize(("rank", "needle"), [("0", "positive"), ("17", "r <= 16")])
def test_bad_rank(tiny_model_dir, tmp_path, data, capsys, rank, needle):
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", *(["--rank", rank]))
    fails_with(capsys, code, needle)


def test_4bit_without_working_bitsandbytes(tiny_model_dir, tmp_path, data, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this platform")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    code = run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--4bit")
    fails_with(capsys, code, "bitsandbytes", "no kernel for this platform", "drop --4bit")


def test_existing_output_dir_is_refused_then_overwritten(tiny_model_dir, tmp_path, data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails_with(capsys, run_cli(tiny_model_dir("llama"), data, out), "--overwrite", "--resume")
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_cli(tiny_model_dir("llama"), data, out, "--overwrite") == 0
    assert not (out / "precious.txt").exists()


def test_missing_pad_token_and_long_samples_are_fixed_and_reported(tmp_path, capsys):
    model = save_tiny("llama", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{"prompt": "1 plus 1 is" if i % 2 else "1 plus 1 is 2. " * 3, "completion": " 2"} for i in range(16)]
    data, short = tmp_path / "d.jsonl", tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[1::2]))
    assert run_cli(model, str(data), tmp_path / "out", "--seq-len", "24", "--eval-dataset", str(short)) == 0
    out = capsys.readouterr().out
    assert "no pad token" in out
    assert "8 truncated to --seq-len 24, 8 dropped with no response token" in out


# ------------------------------------------------------------------------------------- numerical faults
def test_nan_gradient_names_the_layer_and_writes_nothing(tiny_model_dir, tmp_path, data, capsys, monkeypatch):
    real = initialization.accumulate_chunk

    def poisoned(*args, **kwargs):
        grads = real(*args, **kwargs)
        name = sorted(grads)[0]
        grads[name][0, 0] = float("nan")
        return grads

    monkeypatch.setattr(initialization, "accumulate_chunk", poisoned)
    out = tmp_path / "out"
    _, err = fails_with(capsys, run_cli(tiny_model_dir("llama"), data, out), "NaN or inf", "model.layers.0")
    assert "nothing was written" in err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("chunking", [(), ("--init-memory-gb", "4")], ids=["auto", "one-chunk"])
def test_zero_gradient_layer_falls_back_to_plain_lora(tiny_model_dir, tmp_path, data, monkeypatch, chunking):
    real = initialization.accumulate_chunk
    victim = "model.layers.1.mlp.down_proj"

    def unused_layer(*args, **kwargs):
        grads = real(*args, **kwargs)
        if victim in grads:  # the chunk that holds it (the automatic budget plans several)
            grads[victim].zero_()
        return grads

    monkeypatch.setattr(initialization, "accumulate_chunk", unused_layer)
    with pytest.warns(UserWarning, match="zero gradient"):
        assert run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--max-steps", "1", *chunking) == 0
    tensors = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    b = tensors[f"base_model.model.{victim}.lora_B.weight"]
    assert torch.equal(b[:, 4:], torch.zeros_like(b[:, 4:]))  # -B0 = 0: plain LoRA's B=0 start


class PoisonAtStep3(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:  # during optimizer step 3
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))


def test_nan_during_training_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, data, capsys,
                                                                      monkeypatch):
    real = training.build_trainer
    monkeypatch.setattr("qloraga.recipe.build_trainer",
                        lambda *a, **k: (t := real(*a, **k), t.add_callback(PoisonAtStep3()))[0])
    out = tmp_path / "out"
    code = run_cli(tiny_model_dir("llama"), data, out, "--save-steps", "1", "--max-steps", "6")
    fails_with(capsys, code, "step 3", "checkpoint-2", "--resume")
    assert Path(last_checkpoint(out)).name == "checkpoint-2"
    weights = load_file(Path(last_checkpoint(out)) / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def stop_step(model: torch.nn.Module) -> int | None:
    """The step StopOnNonFiniteLoss flags after one optimizer step on `model` (None: it trains on)."""
    from transformers import TrainerControl, TrainerState

    guard, control = training.StopOnNonFiniteLoss(), TrainerControl()
    guard.on_step_end(None, TrainerState(global_step=7), control, model=model)
    assert control.should_training_stop == (guard.bad_step is not None)
    return guard.bad_step


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_nan_guard_catches_one_bad_element_in_any_trainable_tensor(bad):
    """One fused check over every trainable tensor, whatever its dtype: one bad element in any single one
    stops training; large finite fp16/bf16 values (whose squares would overflow) and a NaN in a frozen
    weight do not."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4).to(torch.bfloat16),
                                torch.nn.Linear(4, 4).to(torch.float16), torch.nn.Linear(4, 2))
    model[3].requires_grad_(False)
    with torch.no_grad():
        model[2].weight.fill_(60000.0)
        model[1].weight.fill_(1e30)
        model[3].weight[0, 0] = float("nan")
    assert stop_step(model) is None
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        keep = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[-1] = bad
        assert stop_step(model) == 7, param.shape
        with torch.no_grad():
            param.copy_(keep)
    assert len(trainable) == 6 and stop_step(model) is None


# ----------------------------------------------------------------------------------------- interruption
def cli(model, data, out, *extra):
    """The command as a user runs it, in a fresh process."""
    argv = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--model", model, "--dataset", data,
            "--output-dir", str(out), "--4bit", "--rank", "4", "--batch-size", "2", "--grad-accum", "1",
            "--seq-len", "64", "--lr", "1e-3", "--logging-steps", "1", "--eval-samples", "2", "--max-steps", "12",
            "--no-gradient-checkpointing", "--dtype", "float32", "--init", "lora-ga", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(predicate, proc, timeout=240.0):
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - start < timeout
        time.sleep(0.05)


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run: the adapter every interrupted run must reproduce to the last bit."""
    tmp = tmp_path_factory.mktemp("straight")
    data = write_dataset(tmp / "train.jsonl", "prompt-completion", n=48)
    proc = cli(tiny_model_dir("llama"), data, tmp / "out", "--save-steps", "100", "--ga-batches", "8")
    assert proc.wait() == 0, proc.stdout.read()
    return data, adapter(tmp / "out")


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes_identically(tiny_model_dir, tmp_path, straight_run):
    data, expected = straight_run
    out = tmp_path / "out"
    proc = cli(tiny_model_dir("llama"), data, out, "--save-steps", "100", "--ga-batches", "8")
    wait_for(lambda: logged_steps(out) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log
    assert "Traceback" not in log and "--resume" in log
    checkpoint = last_checkpoint(out)
    assert checkpoint is not None and int(checkpoint.rsplit("-", 1)[1]) >= 3
    proc = cli(tiny_model_dir("llama"), data, out, "--save-steps", "100", "--ga-batches", "8", "--resume")
    assert proc.wait() == 0, proc.stdout.read()
    assert_same_adapter(adapter(out), expected)


def test_sigkill_during_init_and_training_then_resume_finishes_identically(tiny_model_dir, tmp_path,
                                                                           straight_run):
    data, expected = straight_run
    out = tmp_path / "out"
    extra = ("--save-steps", "100", "--ga-batches", "8")
    (tmp_path / "c.yaml").write_text("lora_ga:\n  chunk_blocks: 1\n")
    # 1. killed during the LoRA-GA initialisation, right after its first chunk was cached
    proc = cli(tiny_model_dir("llama"), data, out, *extra, "--config", str(tmp_path / "c.yaml"))
    wait_for(lambda: any((out / "lora_ga_cache").glob("chunk-*.safetensors")), proc)
    proc.kill()
    proc.wait()
    # 2. resumed, then killed during training
    proc = cli(tiny_model_dir("llama"), data, out, *extra, "--config", str(tmp_path / "c.yaml"), "--resume",
               "--save-steps", "2")
    wait_for(lambda: logged_steps(out) >= 5, proc)
    proc.kill()
    log = proc.communicate()[0]
    assert "from cache" in log and "(0 from cache)" not in log, log
    # 3. resumed to the end
    proc = cli(tiny_model_dir("llama"), data, out, *extra, "--config", str(tmp_path / "c.yaml"), "--resume",
               "--save-steps", "2")
    log = proc.communicate()[0]
    assert proc.returncode == 0, log
    assert_same_adapter(adapter(out), expected)


# ----------------------------------------------------------------------------------------------- safety
class Payload:
    """Unpickling this would create a file: proof that a pickle was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_in_a_checkpoint_is_refused(tiny_model_dir, tmp_path, data, capsys):
    out = tmp_path / "out"
    assert run_cli(tiny_model_dir("llama"), data, out, "--max-steps", "2") == 0
    checkpoint = Path(last_checkpoint(out))
    pwned = tmp_path / "pwned"
    with (checkpoint / "rng_state.pth").open("wb") as f:
        pickle.dump(Payload(str(pwned)), f)
    capsys.readouterr()
    code = run_cli(tiny_model_dir("llama"), data, out, "--max-steps", "4", "--resume")
    fails_with(capsys, code, "refused", "weights_only=True")
    assert not pwned.exists()


def test_a_pickle_posing_as_a_cache_file_is_never_unpickled(tiny_model_dir, tmp_path, data):
    cache = tmp_path / "out" / "lora_ga_cache"
    cache.mkdir(parents=True)
    pwned = tmp_path / "pwned"
    with (cache / "chunk-evil.safetensors").open("wb") as f:
        pickle.dump(Payload(str(pwned)), f)
    with pytest.warns(UserWarning, match="Ignoring cache file"):
        assert run_cli(tiny_model_dir("llama"), data, tmp_path / "out", "--resume", "--max-steps", "1") == 0
    assert not pwned.exists()


def test_remote_code_is_off_unless_asked(tiny_model_dir):
    from qloraga.cli.finetune import resolve

    assert resolve({"model": tiny_model_dir("llama")}).trust_remote_code is False
    assert resolve({"model": tiny_model_dir("llama"), "trust_remote_code": True}).trust_remote_code is True
