"""The GPU path on a CPU: the model's tensors on a fake CUDA device, so that what would crash on a GPU crashes here.

`FakeCuda` is a tensor that says it lives on `cuda:0` (`.device`, `.is_cuda`) while its values sit in a CPU
tensor, and that behaves as a CUDA tensor does where the GPU path has failed before: `.numpy()` raises
(until `.cpu()`), an op mixing it with a CPU tensor that is not a 0-d scalar raises, `torch.zeros(...,
device="cuda")` and `t.to("cuda")` give one (`FakeCudaMode`), and `torch.cuda`'s memory, cache and RNG
functions answer (`fake_gpu`). What it cannot carry is autograd (a CPU build has no CUDA device guard, which
the autograd engine asks for): it never requires grad. So the gradient passes run on the CPU and are
replayed (`replay_gradients`) into an init whose model, accumulators, SVDs and factors are on the fake GPU,
and the exports read a trained model moved there (`to_fake_gpu`), as `load_run_model` puts a run on CUDA.

Each test here failed on the code before its fix (issue 25 section 1): the GGUF adapter's `.numpy()` on CUDA
tensors, collectives on CPU tensors under NCCL, the CUDA cache never released after the init nor after a
failed chunk's references were gone, an out-of-memory in the SVD not retried, and a CPU model on a machine
with a GPU measured as a GPU model.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_batches
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

from qloraga import QLoraGAConfig, get_qloraga_model, load_model

CUDA = torch.device("cuda", 0)
COPIES = (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)  # may cross devices, as on a GPU


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
            if isinstance(x, torch.Tensor) and x.dim() > 0 and func not in COPIES:
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
           torch.Tensor.contiguous}
SCALARS = {torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__bool__,
           torch.Tensor.item}


class FakeCudaMode(TorchFunctionMode):
    """Tensors made for or moved to a CUDA device become FakeCuda: `device="cuda"` factories, `.to("cuda")`,
    `.cuda()`; and the few methods a CPU build cannot run on a CUDA-typed tensor run on its values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
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

    with pytest.MonkeyPatch.context() as patch, FakeCudaMode():
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
        patch.setattr(torch.cuda, "default_generators", (torch.Generator(),))
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
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([x, torch.ones(2, 3)])
    assert (x * torch.tensor(2.0)).device == CUDA  # a 0-d CPU scalar is allowed, as on a GPU
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
    model = get_qloraga_model(tiny_fp32(model_dir), QLoraGAConfig(r=4, progress=False), make_batches(n_batches=2))
    with torch.no_grad():  # a trained adapter: B A - B0 A0 != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 1e-2)
    on_cpu = exported_files(model, tokenizer, tmp_path / "cpu")
    with fake_gpu_on():
        to_fake_gpu(model)
        assert {p.device for p in model.parameters()} == {CUDA}
        on_gpu = exported_files(model, tokenizer, tmp_path / "gpu")
    assert list(on_gpu) == list(on_cpu)
    for name, data in on_cpu.items():
        assert on_gpu[name] == data, name


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
