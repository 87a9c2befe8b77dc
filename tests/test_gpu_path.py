"""The GPU path on a CPU: the model's tensors on a fake CUDA device, so that what would crash on a GPU crashes here.

`FakeCuda` is a tensor that says it lives on `cuda:0` (`.device`, `.is_cuda`) while its values sit in a CPU
tensor, and that behaves as a CUDA tensor does where the GPU path has failed before: `.numpy()` raises
(until `.cpu()`), an op mixing it with a CPU tensor that is not a 0-d scalar raises, `torch.zeros(...,
device="cuda")` and `t.to("cuda")` give one (`FakeCudaMode`), and `torch.cuda`'s memory, cache and RNG
functions answer (`fake_gpu`). What it cannot carry is autograd (a CPU build has no CUDA device guard, which
the autograd engine asks for): it never requires grad. So the gradient passes run on the CPU and are
replayed (`replay_gradients`) into an init whose model, accumulators, SVDs and factors are on the fake GPU,
and the exports read a trained model moved there (`to_fake_gpu`), as `load_run_model` puts a run on CUDA.

The tests of issue 25 section 1's fixes each failed on the code before them: the GGUF adapter's `.numpy()` on
CUDA tensors, collectives on CPU tensors under NCCL, the CUDA cache never released after the init nor after a
failed chunk's references were gone, an out-of-memory in the SVD not retried, and a CPU model on a machine
with a GPU measured as a GPU model. The others keep the GPU path's other steps (the whole init, the
optimizer's step, every export) on the fake device, so a new CPU-only line there fails here first.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import make_batches
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

from qloraga import QLoraGAConfig, distributed, get_qloraga_model, load_model
from qloraga.init import gradient, pipeline, sketch
from qloraga.init.pipeline import initial_factors
from qloraga.memory import free_memory_bytes
from qloraga.targets import find_target_layers

CUDA = torch.device("cuda", 0)
COPIES = (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)  # may cross devices, as on a GPU
INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)


def cuda_device(device) -> bool:
    return device is not None and (isinstance(device, int) or torch.device(device).type == "cuda")


class FakeCuda(torch.Tensor):
    """A tensor on `cuda:0` as far as its users can tell, computed on the CPU (`inner`)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                  storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                  layout=inner.layout, device=CUDA, requires_grad=False)
        out.inner = inner
        return out

    def __repr__(self) -> str:
        return f"FakeCuda({self.inner!r})"

    def numpy(self, *, force: bool = False):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def __array__(self, dtype=None, copy=None):
        return self.numpy()

    def tolist(self):  # CUDA tensors copy to the host for this
        return self.inner.tolist()

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise RuntimeError("FakeCuda carries no autograd (see the module docstring): run this part on the CPU.")
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def unwrap(x):
            if isinstance(x, FakeCuda):
                return x.inner
            cpu_index = func in INDEXING and isinstance(x, torch.Tensor) and not x.is_floating_point()
            if isinstance(x, torch.Tensor) and x.dim() > 0 and func not in COPIES and not cpu_index:
                raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                                   f"cuda:0 and cpu! ({func})")
            return torch.device("cpu") if isinstance(x, torch.device) and x.type == "cuda" else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device") or CUDA).type == "cpu":
            return out  # .cpu(), .to("cpu"): a plain CPU tensor
        wrapped = tree_map(lambda x: FakeCuda(x) if isinstance(x, torch.Tensor) else x, out)
        return return_and_correct_aliasing(func, args, kwargs, wrapped)


def inner(x):
    return x.inner if isinstance(x, FakeCuda) else x


def on_fake(x):
    return FakeCuda(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCuda) else x


# Tensor methods whose Python binding takes a device guard (which a CPU build has not for CUDA): run on the values.
GUARDED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.nonzero, torch.Tensor.new_tensor,
           torch.Tensor.contiguous, torch.Tensor.__invert__}
SCALARS = {torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__bool__,
           torch.Tensor.item}


class FakeCudaMode(TorchFunctionMode):
    """Tensors made for or moved to a CUDA device become FakeCuda: `device="cuda"` factories, `.to("cuda")`,
    `.cuda()`; and the few methods a CPU build cannot run on a CUDA-typed tensor run on its values, as do
    torch's functions written in Python (inside them this mode is off, so their own `device=` would not reach
    it). qloraga's code is not a torch function: every op it runs passes here or through FakeCuda's dispatch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
            if cuda_device(device):
                x = inner(args[0])
                return FakeCuda(x.to(dtype=dtype or x.dtype, copy=True))
        elif func is torch.Tensor.cuda:
            return args[0] if isinstance(args[0], FakeCuda) else FakeCuda(args[0].clone())
        elif func is torch.Tensor.pin_memory:
            raise RuntimeError("pin_memory: only a CPU tensor can be pinned" if isinstance(args[0], FakeCuda) else
                               "pin_memory needs a CUDA machine: check torch.cuda.is_available() first")
        elif func is torch.Tensor.copy_:
            inner(args[0]).copy_(inner(args[1]))
            return args[0]
        elif func in SCALARS and isinstance(args[0], FakeCuda):
            return func(args[0].inner, *args[1:], **kwargs)
        elif func in GUARDED and any(isinstance(a, FakeCuda) for a in args):
            fake = isinstance(args[0], FakeCuda)
            out = func(*tree_map(inner, args), **tree_map(inner, kwargs))
            return tree_map(on_fake, out) if fake else out
        elif cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return tree_map(on_fake, func(*args, **kwargs))
        elif inspect.isfunction(func) and any(isinstance(a, FakeCuda) for a in tree_flatten((args, kwargs))[0]):
            # torch's own Python functions (svd_lowrank, Tensor.norm) run with this mode off: on the values
            return tree_map(on_fake, func(*tree_map(inner, args), **tree_map(inner, kwargs)))
        return func(*args, **kwargs)


class FakeCudaFactories(TorchDispatchMode):
    """The factories that torch's C++ code calls with a CUDA device (the scalar of `torch.where(mask, x, -inf)`),
    which no Python function sees: made on the CPU, as FakeCuda."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if cuda_device(kwargs.get("device")) and not any(isinstance(a, FakeCuda) for a in tree_flatten(args)[0]):
            return tree_map(on_fake, func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


@contextmanager
def fake_gpu_on() -> Iterator[types.SimpleNamespace]:
    """One fake CUDA device: FakeCudaMode on, and torch.cuda's device, memory, cache and RNG functions answering
    (`gpu.calls` records the cache releases and peak resets, `gpu.free` is what mem_get_info reports)."""
    gpu = types.SimpleNamespace(calls=[], free=3 * 2**30, reserved=2 * 2**30, allocated=2**30, on_release=None)

    def release():
        gpu.calls.append("empty_cache")
        if gpu.on_release:
            gpu.on_release()

    with pytest.MonkeyPatch.context() as patch, FakeCudaMode(), FakeCudaFactories():
        for name, fn in {
            "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
            "mem_get_info": lambda device=None: (gpu.free, 80 * 2**30),
            "memory_reserved": lambda device=None: gpu.reserved, "memory_allocated": lambda device=None: gpu.allocated,
            "max_memory_allocated": lambda device=None: gpu.allocated,
            "reset_peak_memory_stats": lambda device=None: gpu.calls.append("reset_peak"),
            "empty_cache": release, "synchronize": lambda device=None: None,
            "get_rng_state": lambda device="cuda": torch.get_rng_state(),
            "set_rng_state": lambda state, device="cuda": None,
        }.items():
            patch.setattr(torch.cuda, name, fn)
        # the fake device draws its random numbers on the CPU: seeding "its" generator seeds those draws
        patch.setattr(torch.cuda, "default_generators", (torch.default_generator,))
        yield gpu


@pytest.fixture
def fake_gpu():
    with fake_gpu_on() as gpu:
        yield gpu


def to_fake_gpu(model: nn.Module) -> nn.Module:
    """Every parameter and buffer of `model` on the fake GPU (frozen: FakeCuda has no autograd); tied weights
    stay tied."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(FakeCuda(p.detach()), requires_grad=False)
                module._parameters[name] = moved[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = FakeCuda(b)
    return model


def tiny_fp32(model_dir: str) -> nn.Module:
    """The tiny model unquantized in fp32, eager attention (SDPA on a CUDA-typed tensor picks CUDA kernels)."""
    return load_model(model_dir, load_in_4bit=False, dtype=torch.float32, device_map="cpu",
                      attn_implementation="eager")


# ------------------------------------------------------------------------------------- the fake itself


def test_fake_cuda_fails_where_cuda_fails(fake_gpu):
    """The fake is only worth its tests if it refuses what a GPU refuses and allows what a GPU allows."""
    x = torch.arange(6.0).reshape(2, 3).to("cuda")
    assert isinstance(x, FakeCuda) and x.is_cuda and x.device == CUDA
    with pytest.raises(TypeError, match="can't convert cuda"):
        x.numpy()
    with pytest.raises(TypeError, match="can't convert cuda"):
        np.asarray(x)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([x, torch.ones(2, 3)])
    assert (x * torch.tensor(2.0)).device == CUDA  # a 0-d CPU scalar is allowed, as on a GPU
    assert x[:, torch.tensor([2, 0])].tolist() == [[2, 0], [5, 3]]  # so are CPU indices
    with pytest.raises(RuntimeError, match="same device"):
        x.index_select(1, torch.tensor([2, 0]))  # but not here
    assert type(x.cpu()) is torch.Tensor and x.cpu().numpy().sum() == 15
    assert torch.zeros(2, device=x.device).device == CUDA and x.tolist() == [[0, 1, 2], [3, 4, 5]]
    y = torch.zeros(2, 3)
    y.copy_(x)  # copies cross devices
    assert y.sum().item() == 15 and x[1, 2].item() == 5
    with pytest.raises(RuntimeError, match="autograd"):
        x.requires_grad_()


# ------------------------------------------------------------------------------- 1. exports on a GPU


def exported_files(model, tokenizer, out: Path) -> dict[str, bytes]:
    from qloraga.export import export_adapter, export_merged
    from qloraga.export.gguf import write_adapter_gguf, write_model_gguf

    export_adapter(model, out / "adapter")
    export_merged(model, out / "merged")
    write_adapter_gguf(model, out / "adapter.gguf")
    write_model_gguf(model, tokenizer, out / "model-q8_0.gguf", "q8_0")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_exports_from_a_model_on_the_gpu_write_what_the_cpu_writes(gguf_model_dir, tmp_path):
    """`qloraga export` (`load_run_model` puts the run on CUDA): the PEFT adapter, the merged model and the GGUF
    files of a model on the GPU are byte for byte those of the same model on the CPU. Before the fix the GGUF
    adapter called `.numpy()` on the CUDA tensors and raised."""
    from transformers import AutoTokenizer

    model_dir = gguf_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = trained_model(model_dir)
    on_cpu = exported_files(model, tokenizer, tmp_path / "cpu")
    with fake_gpu_on():
        to_fake_gpu(model)
        assert {p.device for p in model.parameters()} == {CUDA}
        on_gpu = exported_files(model, tokenizer, tmp_path / "gpu")
    assert list(on_gpu) == list(on_cpu)
    for name, data in on_cpu.items():
        assert on_gpu[name] == data, name


def trained_model(model_dir: str):
    """A tiny LoRA-GA model (fp32, unquantized) whose adapter has moved from its start: B A - B0 A0 != 0."""
    model = get_qloraga_model(tiny_fp32(model_dir), QLoraGAConfig(r=4, progress=False), make_batches(n_batches=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 1e-2)
    return model


def test_qloraga_export_gguf_of_a_run_on_the_gpu(gguf_model_dir, tmp_path, monkeypatch):
    """`qloraga export --format gguf` (the web page's export and the acceptance run's export step call it): the
    run's base and final adapter loaded back (plain rank-2r LoRA layers, not the live model's corrected ones) and
    put on the GPU, as `load_run_model` does on a CUDA machine, write the files the CPU writes."""
    import yaml
    from transformers import AutoTokenizer

    from qloraga import runs
    from qloraga.cli.export import main as export
    from qloraga.config import RunConfig
    from qloraga.export import export_adapter

    model_dir = gguf_model_dir("llama")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(RunConfig(model=model_dir, dtype="float32").to_dict()))
    export_adapter(trained_model(model_dir), run / "adapter", tokenizer=AutoTokenizer.from_pretrained(model_dir))
    assert export(["--run", str(run), "--format", "gguf", "--output", str(tmp_path / "cpu")]) == 0
    model, tokenizer = runs.load_run_model(runs.open_run(run))  # on the CPU: this torch has no CUDA to load onto
    monkeypatch.setattr(runs, "load_run_model", lambda *args, **kwargs: (to_fake_gpu(model), tokenizer))
    with fake_gpu_on():
        assert export(["--run", str(run), "--format", "gguf", "--output", str(tmp_path / "gpu")]) == 0
    written = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert "adapter.gguf" in written and written == sorted(p.name for p in (tmp_path / "gpu").iterdir())
    for name in written:
        assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name


def test_a_scaled_optimizer_steps_on_the_gpu(fake_gpu):
    """scaled_adamw's r x r preconditioners and AdamW's step with the LoRA factors and their gradients on the GPU
    take the CPU's steps (no tensor of theirs left on the CPU)."""
    from qloraga.optim import ScaledAdamW

    torch.manual_seed(0)
    values = [torch.randn(4, 16), torch.randn(32, 4)]
    grads = [torch.randn(4, 16), torch.randn(32, 4)]

    def steps(device: str) -> list[torch.Tensor]:
        a, b = (nn.Parameter(v.clone().to(device), requires_grad=False) for v in values)  # FakeCuda: no autograd
        a.grad, b.grad = (g.clone().to(device) for g in grads)
        optimizer = ScaledAdamW([a, b], [(a, b)], lr=1e-2)
        for _ in range(2):
            optimizer.step()
        return [a.detach().cpu(), b.detach().cpu()]

    on_gpu = steps("cuda")
    for x, y in zip(on_gpu, steps("cpu"), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(on_gpu[0], values[0])  # it moved


def test_evaluation_on_the_gpu_matches_the_cpu(tiny_model_dir):
    """The held-out loss and greedy answers (every run's before and after, `qloraga evaluate`) with the model on
    the GPU: the batches, the left-padded prompts and generation's own tensors go to it, and give the CPU's."""
    from conftest import tiny_tokenizer

    from qloraga.batches import Collator, tokenize
    from qloraga.evaluation import greedy_answers, held_out_loss

    tokenizer = tiny_tokenizer()
    records = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(3) for b in range(3)]
    examples, _ = tokenize(records, "prompt-completion", tokenizer, 32)
    prompts = [e.input_ids[: 3 + i] for i, e in enumerate(examples[:3])]  # unequal lengths: left padding

    def evaluate(model) -> tuple[float, list[str]]:
        return (held_out_loss(model, examples, Collator(tokenizer.pad_token_id), batch_size=4),
                greedy_answers(model, tokenizer, prompts, 4, batch_size=2))

    model = trained_model(tiny_model_dir("llama"))
    on_cpu = evaluate(model)
    with fake_gpu_on():
        on_gpu = evaluate(to_fake_gpu(model))
    assert on_gpu == on_cpu


@pytest.fixture(scope="module")
def gguf_model_dir(tmp_path_factory):
    """Folder factory: a tiny model of a family with a byte-level tokenizer (GGUF export needs one)."""
    from conftest import save_family

    made: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in made:
            made[family] = save_family(family, tmp_path_factory.mktemp(family))
        return made[family]

    return make


# ------------------------------------------------------------------------- 2. collectives under NCCL


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    """A real gloo group of one process, that `qloraga.distributed` treats as a group of several."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    monkeypatch.setattr(distributed, "active", lambda: True)
    yield
    dist.destroy_process_group()


def checked_collectives(monkeypatch, backend: str) -> list[tuple[str, torch.device]]:
    """Say the group's backend is `backend` and record the device of every collective's tensor; the collectives
    run on gloo with the values, as if a second rank held the same values (all_reduce doubles them) and rank 0
    held sevens (broadcast), so a result that does not reach the caller's tensor shows."""
    seen: list[tuple[str, torch.device]] = []
    real_all_reduce, real_broadcast, real_objects = dist.all_reduce, dist.broadcast, dist.broadcast_object_list

    def all_reduce(tensor, *args, **kwargs):
        seen.append(("all_reduce", tensor.device))
        real_all_reduce(inner(tensor), *args, **kwargs)
        inner(tensor).mul_(2)

    def broadcast(tensor, src, *args, **kwargs):
        seen.append(("broadcast", tensor.device))
        real_broadcast(inner(tensor), src, *args, **kwargs)

    def broadcast_object_list(objects, src=0, group=None, device=None, **kwargs):
        seen.append(("broadcast_object_list", torch.device(device or "cpu")))
        real_objects(objects, src=src, group=group)

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast", broadcast)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    return seen


EXPECTED = {"nccl": CUDA, "gloo": torch.device("cpu")}


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_collectives_run_on_the_device_of_the_backend(fake_gpu, one_process_group, monkeypatch, backend, where):
    """torchrun and `accelerate launch` start NCCL, which has no CPU tensors: every collective's tensor is on the
    current CUDA device under NCCL and on the CPU under gloo, wherever the caller's tensors are, and the result
    comes back into them. Before the fix `global_mean_` all-reduced a CPU count under NCCL."""
    seen = checked_collectives(monkeypatch, backend)
    grads = {"b": torch.full((2, 3), 4.0, device=where), "a": torch.arange(3.0, device=where)}
    out = distributed.global_mean_(grads, local_batches=3)  # two ranks of 3 batches, the same means
    torch.testing.assert_close(out["a"].cpu(), torch.arange(3.0))
    torch.testing.assert_close(out["b"].cpu(), torch.full((2, 3), 4.0))
    factors = [torch.zeros(2, device=where), torch.ones(3, device=where)]
    distributed.broadcast_(factors)
    assert distributed.broadcast_object({"run": "a"}) == {"run": "a"}
    assert [kind for kind, _ in seen] == ["all_reduce"] * 3 + ["broadcast"] * 2 + ["broadcast_object_list"]
    assert {device for _, device in seen} == {EXPECTED[backend]}
    assert all(t.device.type == where for t in (*out.values(), *factors))


# ------------------------------------------------------------------------ the init on a (fake) GPU


def replay_gradients(monkeypatch, cpu_model: nn.Module) -> None:
    """The gradient passes (exact and sketch) run on `cpu_model` (autograd, which the fake GPU lacks) and hand
    their (x, delta) pairs to the init on the fake GPU as FakeCuda tensors."""
    real = gradient.backward_pass
    cpu_layers = find_target_layers(cpu_model)

    def on_gpu(model, layers, batches, on_pair, progress=None, checkpointing=False):
        pairs = []  # handed over once the backward pass is done: FakeCudaMode is off inside `loss.backward()`
        with torch._C.DisableTorchFunction(), _disable_current_modes():  # the CPU twin needs no fake (and is faster)
            n = real(cpu_model, {n: cpu_layers[n] for n in layers}, batches,
                     lambda name, x, delta: pairs.append((name, x, delta)), progress, checkpointing)
        for name, x, delta in pairs:
            on_pair(name, FakeCuda(x), FakeCuda(delta))
        return n

    monkeypatch.setattr(gradient, "backward_pass", on_gpu)
    monkeypatch.setattr(sketch, "backward_pass", on_gpu)


def assert_same_factors(gpu: dict, cpu: dict) -> None:
    assert list(gpu) == list(cpu)
    for name, (a, b) in gpu.items():
        assert a.device == CUDA and b.device == CUDA, name
        torch.testing.assert_close(a.cpu(), cpu[name][0], rtol=0, atol=0)
        torch.testing.assert_close(b.cpu(), cpu[name][1], rtol=0, atol=0)


SETTINGS = {
    "lora-ga": dict(), "lora-one": dict(method="lora-one"), "gora": dict(method="gora", rank_allocation="gradient"),
    "gradient ranks": dict(rank_allocation="gradient"), "sketch": dict(estimator="sketch"),
    "random directions, weight scale": dict(direction="random", scale="weight_svd"),
    "randomized svd": dict(svd_niter=2), "cache": dict(cache_dir=True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_init_on_the_gpu_matches_the_cpu_and_releases_the_cache(tiny_model_dir, tmp_path, monkeypatch, fake_gpu,
                                                                 setting):
    """The init with the model on the GPU (its accumulators, sketches, SVDs, summaries and factors there) gives
    the CPU's factors bit for bit, measures the GPU, and hands the CUDA cache back when it ends, before
    training's optimizer allocates. Before the fix the cache was never released after an init."""
    settings = dict(SETTINGS[setting])
    if settings.pop("cache_dir", False):
        settings["cache_dir"] = str(tmp_path / "cache")
    config = QLoraGAConfig(r=2, progress=False, **settings)
    batches = make_batches(n_batches=2)
    cpu_model = tiny_fp32(tiny_model_dir("llama"))
    on_cpu, _ = initial_factors(cpu_model, find_target_layers(cpu_model), batches, config)
    if config.cache_dir:
        Path(config.cache_dir).rename(tmp_path / "cpu-cache")  # the GPU's init computes, not reads, its factors
    model = to_fake_gpu(tiny_fp32(tiny_model_dir("llama")))
    replay_gradients(monkeypatch, cpu_model)
    fake_gpu.calls.clear()
    on_gpu, report = initial_factors(model, find_target_layers(model), batches, config)
    assert_same_factors(on_gpu, on_cpu)
    assert report.memory_kind == "GPU max allocated" and report.peak_memory_gb == fake_gpu.allocated / 2**30
    assert fake_gpu.calls == ["reset_peak", "empty_cache"]


@pytest.mark.parametrize("setting", ["lora-ga", "sketch", "gradient ranks"])
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_both_estimators_under_nccl(tiny_model_dir, monkeypatch, fake_gpu, one_process_group, setting, where):
    """Under torchrun's NCCL group the exact estimator's accumulators, the sketch's products, the allocation's
    ranks and the broadcast factors all travel on the current CUDA device, whether the model sits on the GPU or
    (a library user's choice) on the CPU, and the factors are those of one process."""
    config = QLoraGAConfig(r=2, progress=False, **SETTINGS[setting])
    batches = make_batches(n_batches=2)
    cpu_model = tiny_fp32(tiny_model_dir("llama"))
    with monkeypatch.context() as alone:
        alone.setattr(distributed, "active", lambda: False)
        expected, _ = initial_factors(cpu_model, find_target_layers(cpu_model), batches, config)
    model = cpu_model
    if where == "cuda":
        model = to_fake_gpu(tiny_fp32(tiny_model_dir("llama")))
        replay_gradients(monkeypatch, cpu_model)
    seen = checked_collectives(monkeypatch, "nccl")
    factors, _ = initial_factors(model, find_target_layers(model), batches, config)
    assert {"all_reduce", "broadcast"} <= {kind for kind, _ in seen}
    assert {device for _, device in seen} == {CUDA}
    for name, (a, b) in expected.items():
        assert factors[name][0].device.type == where
        torch.testing.assert_close(factors[name][0].cpu(), a, rtol=0, atol=0)
        torch.testing.assert_close(factors[name][1].cpu(), b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ 5. memory on CUDA


def test_free_memory_on_cuda_counts_the_caching_allocators_unused_blocks(fake_gpu):
    """What the init may plan on: the driver's free bytes plus the blocks torch caches but does not use."""
    fake_gpu.free, fake_gpu.reserved, fake_gpu.allocated = 5 * 2**30, 3 * 2**30, 2**30
    assert free_memory_bytes(CUDA) == (5 + 3 - 1) * 2**30
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(free_memory_bytes(torch.device("cpu")) - available) < 2**30  # read a moment apart


def test_a_cpu_model_on_a_machine_with_a_gpu_is_measured_on_the_cpu(tiny_model_dir, fake_gpu):
    """A library user whose model is on the CPU while CUDA is available gets CPU behaviour: decided by the
    device of the weights, not `torch.cuda.is_available()` (which said "GPU" before the fix)."""
    model = tiny_fp32(tiny_model_dir("llama"))
    _, report = initial_factors(model, find_target_layers(model), make_batches(n_batches=2),
                                QLoraGAConfig(r=2, progress=False))
    assert report.memory_kind == "process peak RSS"
    assert fake_gpu.calls == []  # no CUDA peak reset, no cache release


def test_an_oom_chunk_is_released_once_nothing_holds_it(tiny_model_dir, monkeypatch, fake_gpu):
    """A chunk that runs out of memory is halved; the CUDA cache is emptied once the failed chunk's tensors have
    no reference left (inside the `except`, its traceback's frames still held them, so nothing was freed)."""
    cpu_model = tiny_fp32(tiny_model_dir("llama"))
    batches = make_batches(n_batches=2)
    config = QLoraGAConfig(r=2, progress=False, init_memory_gb=1.0)  # one chunk of both blocks
    on_cpu, _ = initial_factors(cpu_model, find_target_layers(cpu_model), batches, config)
    model = to_fake_gpu(tiny_fp32(tiny_model_dir("llama")))
    replay_gradients(monkeypatch, cpu_model)
    real, held = pipeline.accumulate_chunk, []

    def out_of_memory_once(model, layers, *args):
        if not held:
            accumulators = torch.zeros(1024, device=CUDA)  # what the failed chunk had allocated
            held.append(weakref.ref(accumulators))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, layers, *args)

    freed = []
    fake_gpu.on_release = lambda: freed.append(held[0]() is None)
    monkeypatch.setattr(pipeline, "accumulate_chunk", out_of_memory_once)
    on_gpu, report = initial_factors(model, find_target_layers(model), batches, config)
    assert report.chunks == 2  # halved
    assert freed[0] is True  # the first release (of the failed chunk) found its tensors gone
    assert_same_factors(on_gpu, on_cpu)


@pytest.mark.parametrize("setting", ["lora-ga", "gora"])
def test_an_oom_in_the_svd_or_summaries_is_retried_on_halves(tiny_model_dir, monkeypatch, setting):
    """The chunk's SVDs and summaries allocate beside its accumulators: an out-of-memory there halves the chunk
    as one in the gradient pass does (before the fix it ended the run), and the factors are the same."""
    settings = dict(SETTINGS[setting])
    model = tiny_fp32(tiny_model_dir("llama"))
    targets, batches = find_target_layers(model), make_batches(n_batches=2)
    config = QLoraGAConfig(r=2, progress=False, init_memory_gb=1.0, **settings)
    expected, _ = initial_factors(model, targets, batches, config)
    real, calls = pipeline.summarise, []

    def out_of_memory_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real(*args)

    monkeypatch.setattr(pipeline, "summarise", out_of_memory_once)
    factors, report = initial_factors(model, targets, batches, config)
    assert report.chunks == 2
    for name, (a, b) in expected.items():
        torch.testing.assert_close(factors[name][0], a, rtol=0, atol=0)
        torch.testing.assert_close(factors[name][1], b, rtol=0, atol=0)


def test_a_block_that_does_not_fit_says_what_to_change(tiny_model_dir, monkeypatch):
    """One decoder block out of memory cannot be halved: a one-line error naming the settings that shrink it."""
    from qloraga.errors import InitOutOfMemory

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipeline, "accumulate_chunk", out_of_memory)
    model = tiny_fp32(tiny_model_dir("llama"))
    with pytest.raises(InitOutOfMemory, match=r"--ga-batches, --seq-len.*lora_ga\.svd_niter"):
        initial_factors(model, find_target_layers(model), make_batches(n_batches=2),
                        QLoraGAConfig(r=2, progress=False, chunk_blocks=1))
