# Two entry points (see README): `make run` (main job) and `make test` (the test suite).
# Both create .venv and install the package with its dev extra on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m benchmarks

# Triton kernels run on the CPU through Triton's interpreter; the same run also checks the
# PyTorch reference path and compiles every launched kernel for sm_80/sm_90.
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -rs
