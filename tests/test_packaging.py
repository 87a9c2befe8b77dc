"""The built wheel, installed outside the source tree, works on its own: presets, demo, the `qloraga` command."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the wheel from this checkout and install it (no dependencies) into a folder of its own."""
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True)  # -v: setuptools' output
    assert build.returncode == 0, build.stderr
    log = build.stdout + build.stderr
    assert not re.findall(r"\w+Warning: .*", log)  # e.g. setuptools' BuildBackendWarning on a `license` table
    (wheel,) = wheels.glob("qloraga-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    return wheel, target


def run(target: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run from `cwd` (outside the repository) with only the installed copy of qloraga importable."""
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_ships_presets_license_and_commands(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"qloraga/configs/demo.yaml", "qloraga/configs/llama.yaml", "qloraga/demo/data/train.jsonl"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "qloraga = qloraga.cli:main" in entry_points
    assert "qloraga-finetune = qloraga.cli.finetune:main" in entry_points


def test_installed_copy_lists_and_loads_presets(installed, tmp_path):
    _, target = installed
    code = ("import json, qloraga, qloraga.presets as p; "
            "print(json.dumps({'file': qloraga.__file__, 'presets': p.available_presets(), "
            "'demo': p.load_preset('demo'), 'qwen2': p.load_preset('qwen2')}))")
    result = run(target, tmp_path, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(target.resolve())  # the installed copy, not the checkout
    assert {"demo", "llama", "qwen2"} <= set(info["presets"])
    assert info["demo"]["lora_ga"]["r"] == 8 and info["qwen2"]["lora_ga"]["svd_niter"] == 4  # `extends: llama`


def test_installed_command_and_subcommands(installed, tmp_path):
    _, target = installed
    command = target / "bin" / "qloraga"
    overview = run(target, tmp_path, str(command), "--help")
    assert overview.returncode == 0, overview.stderr
    for name in ("finetune", "evaluate", "export", "chat"):
        assert name in overview.stdout
    finetune = run(target, tmp_path, str(command), "finetune", "--help")
    assert finetune.returncode == 0, finetune.stderr
    assert finetune.stdout.startswith("usage: qloraga finetune") and "--preset" in finetune.stdout
    legacy = run(target, tmp_path, str(target / "bin" / "qloraga-finetune"), "--help")
    assert legacy.returncode == 0 and "--rank" in legacy.stdout, legacy.stderr
    unknown = run(target, tmp_path, str(command), "train")
    assert unknown.returncode == 2 and "unknown command 'train'" in unknown.stderr


def test_installed_copy_runs_the_demo(installed, tmp_path):
    """The main job on the embedded default, from the wheel alone (a short run: two steps)."""
    _, target = installed
    out = tmp_path / "run"
    result = run(target, tmp_path, str(target / "bin" / "qloraga"), "finetune", "--4bit", "--max-steps", "2",
                 "--ga-batches", "2", "--eval-samples", "4", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "LoRA-GA init:" in result.stdout and "after fine-tuning" in result.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert str(target.resolve()) in json.loads((out / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"]  # the demo model shipped in the installed package


def test_installed_llama_cpp_runs_on_any_x86_64_v3_cpu(tmp_path):
    """The llama.cpp that `make test` installed was built with scripts/llama_cpp_cmake_args' flags, not llama.cpp's
    native ones: its CPU backend has no AVX-512 (a native build on an AVX-512/AMX Xeon segfaults in llama_decode
    on any batch of more than one token). The detector is checked on a library that does use AVX-512."""
    if platform.machine() != "x86_64":
        pytest.skip("the Makefile builds llama.cpp natively on other architectures")
    for tool in ("objdump", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (binutils, gcc: what the llama.cpp build needs too)")
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_carry
    import llama_cpp

    sources = {"-mavx512f": "__m512 f(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }",
               "-mavx2": "__m256 f(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }"}
    for flag, body in sources.items():
        (tmp_path / "f.c").write_text(f"#include <immintrin.h>\n{body}\n")
        lib = tmp_path / f"lib{flag[2:]}.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", flag, "-o", str(lib), str(tmp_path / "f.c")], check=True)
        assert gpu_carry.avx512_in(lib) is (flag == "-mavx512f"), flag
    cpu = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    assert not gpu_carry.avx512_in(cpu), (
        f"{cpu} uses AVX-512: llama-cpp-python was built natively. Rebuild it portably: .venv/bin/pip install "
        "--force-reinstall --no-deps \"$(make -s llama-wheel)\"/llama_cpp_python-*.whl")
